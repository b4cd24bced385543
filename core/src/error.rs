//! Policy errors: every one names the field it is about, as a path like `apps[2].tier`.

use std::fmt;

/// One problem found in a policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Path of the offending field, e.g. `apps[2].quota_overrides[0].expires_at`; empty for the document.
    pub path: String,
    /// What is wrong, in words a policy author understands.
    pub message: String,
    /// 1-based line in the source file, when known (filled in by [`crate::source`] for files).
    pub line: Option<usize>,
}

impl PolicyError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into(), line: None }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for PolicyError {}

/// All problems found in one policy document (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.0))]
pub struct PolicyErrors(pub Vec<PolicyError>);

fn render(errors: &[PolicyError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        PolicyErrors(vec![e])
    }
}

/// Collects errors while walking a document; paths are built with [`Errors::at`].
#[derive(Debug, Default)]
pub(crate) struct Errors(pub(crate) Vec<PolicyError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(PolicyError::new(path, message));
    }
}
