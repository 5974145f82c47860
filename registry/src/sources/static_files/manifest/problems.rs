//! What is wrong with a file: every problem, by file, document and field, collected in one
//! pass so the operator sees them all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use isthmus_proto::config::FieldProblem;

use crate::validate::{self, check_label_key, check_label_value, Invalid};

/// One problem in one file; Display is "FILE[ (document N)]: FIELD.PATH: message", e.g.
/// "deploy/examples/web.yaml (document 2): spec.ports[0].number: 70000 is not a valid port
/// (1-65535)". `field` is empty for problems with the file as a whole (unreadable, not YAML).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ResourceError {
    pub file: PathBuf,
    /// 1-based position of the YAML document in the file.
    pub document: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(n) = self.document {
            write!(f, " (document {n})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ResourceError {
    /// The problem as a configuration problem: `field` is where (file, document, field),
    /// so it reads the same as this error.
    pub fn problem(&self) -> FieldProblem {
        let mut at = self.file.display().to_string();
        if let Some(n) = self.document {
            at += &format!(" (document {n})");
        }
        if !self.field.is_empty() {
            at += &format!(": {}", self.field);
        }
        FieldProblem::new(&at, self.message.clone())
    }
}

/// Collects every problem of one file.
pub(super) struct Problems {
    file: PathBuf,
    /// The document being read (1-based), once reading has begun.
    pub(super) document: Option<usize>,
    /// Put before every field: `items[3].` inside a `List` document, else empty.
    pub(super) prefix: String,
    pub(super) errors: Vec<ResourceError>,
    /// What Istio's validation warns about: the document loads, and the operator is told.
    pub(super) warnings: Vec<ResourceError>,
}

impl Problems {
    pub(super) fn new(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            document: None,
            prefix: String::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub(super) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let e = self.at(field.into(), message.into());
        self.errors.push(e);
    }

    /// Records a warning: the document still loads.
    pub(super) fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let w = self.at(field.into(), message.into());
        self.warnings.push(w);
    }

    fn at(&self, field: String, message: String) -> ResourceError {
        let field = match (self.prefix.strip_suffix('.'), field.is_empty()) {
            (Some(item), true) => item.to_string(),
            _ => format!("{}{field}", self.prefix),
        };
        ResourceError {
            file: self.file.clone(),
            document: self.document,
            field,
            message,
        }
    }

    /// Records `result`'s problem at `field`; returns whether the value passed.
    pub(super) fn check(&mut self, field: impl Into<String>, result: Result<(), Invalid>) -> bool {
        match result {
            Ok(()) => true,
            Err(invalid) => {
                self.add(field, invalid);
                false
            }
        }
    }
}

/// The port `v`, or `None` with its problem recorded at `field`.
pub(super) fn port_or_report(p: &mut Problems, field: String, v: u32) -> Option<u16> {
    match validate::port(v) {
        Ok(port) => Some(port),
        Err(invalid) => {
            p.add(field, invalid);
            None
        }
    }
}

/// Like [`port_or_report`], for a port the field cannot do without.
pub(super) fn required_port(p: &mut Problems, field: &str, v: Option<u32>) -> Option<u16> {
    match v {
        None => {
            p.add(field, "is required");
            None
        }
        Some(v) => port_or_report(p, field.to_string(), v),
    }
}

/// Checks every key and value of a label map, each problem at `field.<key>`.
pub(super) fn check_labels(p: &mut Problems, field: &str, labels: &BTreeMap<String, String>) {
    for (key, value) in labels {
        let f = format!("{field}.{key}");
        if p.check(&f, check_label_key(key)) {
            p.check(f, check_label_value(key, value));
        }
    }
}
