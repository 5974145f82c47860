//! The `grpc` probe: one call of the standard health protocol (`grpc.health.v1.Health/Check`)
//! to the app's host over plaintext HTTP/2, asking about the group's `service` (empty: the
//! server as a whole). SERVING passes; any other answer, or no answer, fails with the reason.

use std::net::IpAddr;
use std::time::Duration;

use isthmus_proto::pb::health::health_check_response::ServingStatus;
use isthmus_proto::pb::health::health_client::HealthClient;
use isthmus_proto::pb::health::HealthCheckRequest;
use tonic::transport::Endpoint;

const USER_AGENT: &str = "isthmus-probe/1.0";

/// Runs the check once against `app_host:port`; `Err` says why it failed.
pub(super) async fn check(
    app_host: IpAddr,
    port: u16,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    let addr = std::net::SocketAddr::new(app_host, port);
    let what = if service.is_empty() {
        format!("grpc health of {addr}")
    } else {
        format!("grpc health of {service:?} at {addr}")
    };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{what}: {e}"))?
        .user_agent(USER_AGENT)
        .map_err(|e| format!("{what}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint.connect().await.map_err(|e| {
        format!(
            "{what}: cannot connect: {}",
            isthmus_proto::program::error_chain(&e)
        )
    })?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await;
    match answer {
        Ok(r) => match r.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!("{what}: {}", other.as_str_name())),
        },
        Err(s) if s.code() == tonic::Code::Unimplemented => Err(format!(
            "{what}: the app does not implement grpc.health.v1.Health ({})",
            s.message()
        )),
        Err(s) => Err(format!("{what}: {:?}: {}", s.code(), s.message())),
    }
}
