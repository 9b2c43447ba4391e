//! Helpers for reading diffusers / transformers `config.json` files.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// A parsed JSON config file that remembers its path for error messages.
#[derive(Debug, Clone)]
pub struct JsonConfig {
    pub path: PathBuf,
    pub value: Value,
}

impl JsonConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        if !value.is_object() {
            return Err(Error::config(path, "expected a JSON object"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            value,
        })
    }

    pub fn from_value(path: impl Into<PathBuf>, value: Value) -> Self {
        Self {
            path: path.into(),
            value,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        match self.value.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn err(&self, message: impl Into<String>) -> Error {
        Error::config(&self.path, message)
    }

    fn bad(&self, key: &str, want: &str, v: &Value) -> Error {
        self.err(format!("field `{key}` must be {want}, got {v}"))
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.bad(key, "a non-negative integer", v)),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    pub fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing required field `{key}`")))
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, "a number", v)),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false", v)),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(key, "a string", v)),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        Ok(self.str_opt(key)?.unwrap_or(default))
    }

    pub fn str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.bad(key, "a list of strings", v))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad(key, "a list of strings", v)),
        }
    }

    pub fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| self.bad(key, "a list of integers", v))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad(key, "a list of integers", v)),
        }
    }

    /// A field that is either one integer (repeated `n` times) or a list of `n` integers.
    pub fn usize_per_block(
        &self,
        key: &str,
        n: usize,
        default: Option<usize>,
    ) -> Result<Vec<usize>> {
        match self.get(key) {
            None => match default {
                Some(d) => Ok(vec![d; n]),
                None => Err(self.err(format!("missing required field `{key}`"))),
            },
            Some(Value::Array(_)) => {
                let list = self.usize_list(key)?.unwrap_or_default();
                if list.len() != n {
                    return Err(self.err(format!(
                        "field `{key}` has {} entries but the model has {n} blocks",
                        list.len()
                    )));
                }
                Ok(list)
            }
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as usize; n])
                .ok_or_else(|| self.bad(key, "an integer or a list of integers", v)),
        }
    }

    /// A field that is either one bool (repeated `n` times) or a list of `n` bools.
    pub fn bool_per_block(&self, key: &str, n: usize, default: bool) -> Result<Vec<bool>> {
        match self.get(key) {
            None => Ok(vec![default; n]),
            Some(Value::Array(items)) => {
                if items.len() != n {
                    return Err(self.err(format!(
                        "field `{key}` has {} entries but the model has {n} blocks",
                        items.len()
                    )));
                }
                items
                    .iter()
                    .map(|v| {
                        v.as_bool()
                            .ok_or_else(|| self.bad(key, "a list of bools", v))
                    })
                    .collect()
            }
            Some(v) => v
                .as_bool()
                .map(|b| vec![b; n])
                .ok_or_else(|| self.bad(key, "a bool or a list of bools", v)),
        }
    }

    /// Fails when `key` is set to something other than one of the supported values.
    pub fn expect_default(&self, key: &str, supported: &[Value]) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) if supported.contains(v) => Ok(()),
            Some(v) => Err(self.err(format!("field `{key}` = {v} is not supported"))),
        }
    }
}

/// How many numbered children `<prefix>N.` the names have: the largest `N + 1` (0 for none),
/// e.g. the block count of `transformer_blocks.` in a list of weight names.
pub fn numbered_count<'a>(names: impl IntoIterator<Item = &'a str>, prefix: &str) -> usize {
    names
        .into_iter()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i.saturating_add(1))
        .max()
        .unwrap_or(0)
}
