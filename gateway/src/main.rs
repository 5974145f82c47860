//! `isthmus-gateway`: parses arguments and runs the east-west gateway until SIGTERM.

fn main() -> anyhow::Result<()> {
    isthmus_proto::telemetry::init();
    anyhow::bail!("not wired yet")
}
