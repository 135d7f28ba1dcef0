//! The weight-loading progress bar, drawn on stderr (only when it is a terminal) from the
//! engine's per-tensor load reports.

use indicatif::{ProgressBar, ProgressStyle};
use mpt_engine::LoadProgress;

const TEMPLATE: &str = "loading weights {bar:40} {pos}/{len} tensors [{elapsed}]";

/// A report callback for [`mpt_engine::EngineHandle::start_reporting`] that draws the bar and
/// clears it once the last tensor is in.
pub(crate) fn loading_bar() -> impl Fn(LoadProgress) + Send + Sync + 'static {
    let style = ProgressStyle::with_template(TEMPLATE).unwrap_or_else(|e| {
        tracing::debug!(error = %e, "progress bar template rejected; using the default bar");
        ProgressStyle::default_bar()
    });
    let bar = ProgressBar::new(0).with_style(style);
    move |progress: LoadProgress| {
        bar.set_length(progress.tensors_total as u64);
        bar.set_position(progress.tensors_loaded as u64);
        if progress.tensors_loaded >= progress.tensors_total {
            bar.finish_and_clear();
        }
    }
}
