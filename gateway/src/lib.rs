//! isthmus-gateway: the proxy core that the east-west gateway and the VM agent share.
//!
//! Built so far: endpoint selection (`balancer`: round robin and power-of-two-choices
//! least-connections, locality priority with failover, outlier ejection with growing
//! back-off); the byte relay (`relay`: `splice(2)` between two TCP sockets, a copy loop with
//! growing buffers for TLS streams, half-close respected, bytes counted also for connections
//! that fail). The SNI routing key and the ClientHello reader live in `isthmus_proto::sni`.

pub mod balancer;
pub mod relay;
