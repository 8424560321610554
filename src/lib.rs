pub mod config;
pub mod patch;
pub mod pull_secret;
pub mod renewal;
pub mod selector;
pub mod token;

/// An API error as an operator needs it: the status and the server's message, nothing more.
pub fn kube_error_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}
