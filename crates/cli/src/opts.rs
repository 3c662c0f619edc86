//! Hand-rolled option parsing: guest arguments after the module must pass through untouched, even
//! ones that look like options.

use ftvm_vm::exit_code;

/// An error for the user: a one-line message, optional detail (a backtrace), and an exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
    pub detail: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: exit_code::USAGE,
            message: message.into(),
            detail: String::new(),
        }
    }
}

impl From<ftvm_vm::VmError> for Failure {
    fn from(e: ftvm_vm::VmError) -> Failure {
        let detail = match &e {
            ftvm_vm::VmError::Trap { backtrace, .. } => backtrace.clone(),
            _ => String::new(),
        };
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
            detail,
        }
    }
}

/// Splits `--name value` / `--name=value` options from positional arguments. Parsing stops at the
/// first positional argument when `stop_at_positional` (the module), so guest arguments pass through.
pub struct Parsed {
    pub options: Vec<(String, String)>,
    pub flags: Vec<String>,
    pub positional: Vec<String>,
}

pub fn parse(
    args: &[String],
    with_value: &[&str],
    flags: &[&str],
    stop_at_positional: bool,
) -> Result<Parsed, Failure> {
    let mut parsed = Parsed {
        options: Vec::new(),
        flags: Vec::new(),
        positional: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            parsed.positional.extend(args[i + 1..].iter().cloned());
            break;
        }
        if let Some(name) = arg.strip_prefix("--") {
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if with_value.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| Failure::usage(format!("--{name} needs a value")))?
                    }
                };
                parsed.options.push((name.to_string(), value));
            } else if flags.contains(&name) && inline.is_none() {
                parsed.flags.push(name.to_string());
            } else {
                return Err(Failure::usage(format!(
                    "unknown option --{name} (see `ftvm help`)"
                )));
            }
            i += 1;
            continue;
        }
        if stop_at_positional {
            parsed.positional.extend(args[i..].iter().cloned());
            break;
        }
        parsed.positional.push(arg.clone());
        i += 1;
    }
    Ok(parsed)
}

impl Parsed {
    pub fn all(&self, name: &str) -> Vec<String> {
        self.options
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
    pub fn one(&self, name: &str) -> Option<String> {
        self.options
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, Failure> {
        match self.one(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Failure::usage(format!("--{name} {v:?} is not a valid number"))),
        }
    }
}
