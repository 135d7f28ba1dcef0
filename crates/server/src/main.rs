//! `mpt-server` binary: parse the configuration, set up logging, serve until SIGTERM/SIGINT.

use mpt_server::config::ServerConfig;

fn main() -> anyhow::Result<()> {
    let config = ServerConfig::from_args()?;
    mpt_server::init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mpt-http")
        .build()?;
    runtime.block_on(mpt_server::run(config))?;
    Ok(())
}
