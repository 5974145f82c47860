//! isthmus-gateway: the proxy core that the east-west gateway and the VM agent share.
//!
//! Built so far: endpoint selection (`balancer`: round robin and power-of-two-choices
//! least-connections, locality priority with failover, outlier ejection with growing
//! back-off). The SNI routing key and the ClientHello reader live in `isthmus_proto::sni`.

pub mod balancer;
