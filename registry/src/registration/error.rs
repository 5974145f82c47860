//! Why a registration was refused, as the metric label counts it and as the gRPC status
//! the agent sees, both decided here and nowhere else.

use std::time::Duration;

use isthmus_proto::identity::IdentityError;
use isthmus_proto::model::ModelError;
use tonic::Status;

use crate::sources::vm_registrations::VmSourceError;

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("Registration needs the VM's mesh client certificate; enrol with the bundle's bootstrap token first")]
    Unauthenticated,
    #[error("no Hello within {}s of opening the stream", .0.as_secs())]
    NoHello(Duration),
    #[error("the stream closed before its Hello")]
    ClosedBeforeHello,
    #[error("the stream broke before its Hello: {}", .0.message())]
    BrokenBeforeHello(Status),
    #[error("the first message of a Registration stream must be Hello")]
    NotHello,
    #[error("Hello comes once per stream; to register again, open a new stream")]
    SecondHello,
    #[error(transparent)]
    BadRequest(#[from] ModelError),
    #[error("WorkloadGroup {namespace}/{group} does not exist in this registry's catalog; check hello.group and hello.namespace against the registry's resources (/debug/resources)")]
    UnknownGroup { namespace: String, group: String },
    #[error("WorkloadGroup {namespace}/{group} cannot be registered into: its template's service account gives no identity ({source})")]
    BadGroup {
        namespace: String,
        group: String,
        #[source]
        source: IdentityError,
    },
    #[error("the caller {caller} may not register into WorkloadGroup {namespace}/{group}, whose workloads run as {expected}")]
    IdentityMismatch {
        caller: String,
        expected: String,
        namespace: String,
        group: String,
    },
    #[error(transparent)]
    Source(#[from] VmSourceError),
}

impl RegistrationError {
    /// The metric label for a refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistrationError::Unauthenticated => "unauthenticated",
            RegistrationError::NoHello(_)
            | RegistrationError::ClosedBeforeHello
            | RegistrationError::BrokenBeforeHello(_) => "no_hello",
            RegistrationError::NotHello
            | RegistrationError::SecondHello
            | RegistrationError::BadRequest(_) => "bad_request",
            RegistrationError::UnknownGroup { .. } => "unknown_group",
            RegistrationError::BadGroup { .. } => "bad_group",
            RegistrationError::IdentityMismatch { .. } => "identity_mismatch",
            RegistrationError::Source(VmSourceError::Held(_)) => "entry_held",
            RegistrationError::Source(VmSourceError::Conflict { .. }) => "entry_conflict",
            RegistrationError::Source(VmSourceError::Store(_)) => "store_error",
        }
    }
}

/// Maps a refusal to its gRPC status, in one place.
pub fn status_of(e: &RegistrationError) -> Status {
    let msg = e.to_string();
    match e {
        RegistrationError::Unauthenticated => Status::unauthenticated(msg),
        RegistrationError::NoHello(_) => Status::deadline_exceeded(msg),
        RegistrationError::ClosedBeforeHello => Status::cancelled(msg),
        // Say, a message over the size limit: tonic's own status says which.
        RegistrationError::BrokenBeforeHello(s) => Status::new(s.code(), msg),
        RegistrationError::NotHello
        | RegistrationError::SecondHello
        | RegistrationError::BadRequest(_) => Status::invalid_argument(msg),
        RegistrationError::UnknownGroup { .. } => Status::not_found(msg),
        RegistrationError::BadGroup { .. } => Status::failed_precondition(msg),
        RegistrationError::IdentityMismatch { .. } => Status::permission_denied(msg),
        RegistrationError::Source(VmSourceError::Held(_) | VmSourceError::Conflict { .. }) => {
            Status::already_exists(msg)
        }
        RegistrationError::Source(VmSourceError::Store(_)) => Status::unavailable(msg),
    }
}
