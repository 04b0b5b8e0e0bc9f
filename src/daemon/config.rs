//! `node.toml`: how one node process runs.
//!
//! ```toml
//! data_dir = "data"                 # relative paths are relative to this file
//! listen = "127.0.0.1:7101"         # UDP address of the QUIC endpoint
//! advertise = "127.0.0.1:7101"      # what peers dial; defaults to listen
//! join = ["127.0.0.1:7101"]         # nodes to join through (first start, with --token)
//! cluster_dir = ".."                # where bootstrap writes the admin credential
//! tick_ms = 100                     # one Raft tick
//!
//! [bootstrap]                       # only on the node that creates the cluster
//! data_groups = 8
//! replication_factor = 3
//! ```
//!
//! A node that has state in `data_dir` restarts from it, whatever else the
//! file says. Without state it bootstraps if `[bootstrap]` is present, and
//! otherwise joins through `join` with the token given on the command line.

use crate::core::routing::{MAX_DATA_GROUPS, MAX_REPLICATION_FACTOR};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub join: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_dir: Option<PathBuf>,
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSection>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSection {
    #[serde(default = "default_data_groups")]
    pub data_groups: u64,
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
}

impl Default for BootstrapSection {
    fn default() -> Self {
        BootstrapSection {
            data_groups: default_data_groups(),
            replication_factor: default_replication_factor(),
        }
    }
}

fn default_tick_ms() -> u64 {
    100
}

fn default_data_groups() -> u64 {
    8
}

fn default_replication_factor() -> usize {
    3
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the node configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the node configuration {path} is not valid: {cause}")]
    Invalid { path: String, cause: String },
}

impl NodeFile {
    /// Reads and validates `path`; relative paths in it become relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |cause: String| ConfigError::Invalid {
            path: path.display().to_string(),
            cause,
        };
        let mut file: NodeFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        file.validate().map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        file.data_dir = base.join(&file.data_dir);
        file.cluster_dir = file.cluster_dir.map(|dir| base.join(dir));
        Ok(file)
    }

    /// The file's text, as `keel up` writes it (fails only for paths that
    /// are not UTF-8).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// The address peers dial.
    pub fn advertised(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }

    fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 || self.tick_ms > 10_000 {
            return Err(format!(
                "tick_ms must be between 1 and 10000, not {}",
                self.tick_ms
            ));
        }
        if self.advertised().ip().is_unspecified() || self.advertised().port() == 0 {
            return Err(format!(
                "peers cannot dial {}; set advertise to a concrete host:port",
                self.advertised()
            ));
        }
        if let Some(b) = &self.bootstrap {
            if b.data_groups == 0 || b.data_groups > MAX_DATA_GROUPS {
                return Err(format!(
                    "bootstrap.data_groups must be between 1 and {MAX_DATA_GROUPS}, not {}",
                    b.data_groups
                ));
            }
            if b.replication_factor == 0 || b.replication_factor > MAX_REPLICATION_FACTOR {
                return Err(format!(
                    "bootstrap.replication_factor must be between 1 and {MAX_REPLICATION_FACTOR}, not {}",
                    b.replication_factor
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<NodeFile, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        NodeFile::load(&path)
    }

    #[test]
    fn a_written_file_loads_back_with_paths_resolved() {
        let file = NodeFile {
            data_dir: "data".into(),
            listen: "127.0.0.1:7101".parse().unwrap(),
            advertise: None,
            join: vec!["127.0.0.1:7102".parse().unwrap()],
            cluster_dir: Some("..".into()),
            tick_ms: 50,
            bootstrap: Some(BootstrapSection::default()),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, file.to_toml().unwrap()).unwrap();
        let loaded = NodeFile::load(&path).unwrap();
        assert_eq!(loaded.data_dir, dir.path().join("data"));
        assert_eq!(loaded.cluster_dir, Some(dir.path().join("..")));
        assert_eq!(loaded.join, file.join);
        assert_eq!(loaded.bootstrap, file.bootstrap);
    }

    #[test]
    fn mistakes_are_named() {
        let err = load("data_dir = \"d\"\nlisten = \"nonsense\"\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = load("data_dir = \"d\"\nlisten = \"127.0.0.1:1\"\ncolour = 1\n").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = load("data_dir = \"d\"\nlisten = \"0.0.0.0:7101\"\n").unwrap_err();
        assert!(err.to_string().contains("advertise"), "{err}");
        let err = load(
            "data_dir = \"d\"\nlisten = \"127.0.0.1:1\"\n[bootstrap]\nreplication_factor = 0\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("replication_factor"), "{err}");
        assert!(matches!(
            NodeFile::load(Path::new("/nonexistent/node.toml")),
            Err(ConfigError::Read { .. })
        ));
    }
}
