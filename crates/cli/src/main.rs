//! `ftvm`: the command line. This file only maps outcomes to exit codes; the work is in `cli`.

mod cli;
mod demo;
mod ft;
mod lab;
mod nic;
mod opts;
mod tiebreak_spec;
mod usernet;
mod vmdef;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match cli::main(args) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("ftvm: {}", failure.message);
            if !failure.detail.is_empty() {
                eprintln!("{}", failure.detail.trim_end());
            }
            failure.code
        }
    };
    std::process::exit(code);
}
