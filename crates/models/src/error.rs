//! The error type of the models crate.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        // Not marked #[source]: the message already carries it, and error-chain printers
        // would repeat it.
        source: std::io::Error,
    },
    /// A config or tokenizer file is malformed or holds an unsupported value.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A request value is outside what the model or sampler accepts.
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The run was stopped by its caller between two steps.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    /// Drops candle's captured backtraces so that messages stay one line.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Candle(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

thread_local! {
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into `None`: for code we do not own that panics on malformed
/// input (candle's GGUF reader divides by a zero alignment) where an error is the answer. While
/// `f` runs, [`panic_is_caught`] is true on this thread, so the process's panic hook can stay
/// quiet about a panic that is not a bug and ends as an error.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Option<T> {
    let outer = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.ok()
}

/// Whether a panic on this thread now would be caught by [`catch_panic`].
pub fn panic_is_caught() -> bool {
    CATCHING.with(|c| c.get())
}
