/* hello: smallest guest. Prints a greeting, its argv and $GREETING.
 * Exit code: atoi(argv[1]) if given, else 0. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    printf("hello from ftvm\n");
    printf("argc=%d\n", argc);
    for (int i = 0; i < argc; i++)
        printf("argv[%d]=%s\n", i, argv[i]);
    const char *greeting = getenv("GREETING");
    if (greeting)
        printf("GREETING=%s\n", greeting);
    else
        printf("GREETING unset\n");
    fflush(stdout);
    return argc > 1 ? atoi(argv[1]) : 0;
}
