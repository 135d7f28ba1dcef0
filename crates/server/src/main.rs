//! `mpt-server` binary: parse the configuration, set up logging, serve until SIGTERM/SIGINT.

use mpt_server::config::ServerConfig;

fn main() -> anyhow::Result<()> {
    keep_step_buffers_in_the_heap();
    let config = ServerConfig::from_args()?;
    mpt_server::init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mpt-http")
        .build()?;
    runtime.block_on(mpt_server::run(config))?;
    Ok(())
}

/// glibc's malloc gives every buffer above 128 KiB (its starting mmap threshold) a fresh mapping
/// and unmaps it on free, so each step of a prompt paid page faults and the kernel's zeroing for
/// its activations again (about 5 % of a 512-token bf16 prefill on the ~125M model). Buffers up
/// to 64 MiB now come from the heap and are reused; the heap is trimmed once 256 MiB are free.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_step_buffers_in_the_heap() {
    // SAFETY: `mallopt` only sets allocator parameters (it takes the allocator's own locks);
    // it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Elsewhere the allocator keeps its defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_step_buffers_in_the_heap() {}
