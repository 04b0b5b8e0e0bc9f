//! The cluster directory (`--dir`, default `./keel-local`): what clients
//! need to reach a cluster (DESIGN.md §9). Bootstrap and `keel up` write it;
//! the CLI reads it.
//!
//! - `admin.cred`: the admin client credential (certificate from the
//!   cluster CA, its key, the trusted CAs), mode 0600;
//! - `staged-ca.cred`: a CA being rotated in, between stage and finalize;
//! - `nodes.json`: `{"nodes": {"1": "127.0.0.1:7101", ...}}`, where to dial;
//! - `node-<id>/`: `keel up`'s node directories (`node.toml`, data, log).

use crate::core::codec::{FrameKind, Wire};
use crate::core::ids::NodeId;
use crate::daemon::files::{self, FileError};
use crate::io::pki::TlsIdentity;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The default cluster directory.
pub const DEFAULT_DIR: &str = "./keel-local";

/// An admin client's credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminCredential {
    pub cluster_id: [u8; 16],
    pub tls: TlsIdentity,
}

impl Wire for AdminCredential {
    const KIND: FrameKind = FrameKind::Credential;
}

/// A CA being rotated in (`keel ca rotate --stage`), kept until finalize
/// so that an interrupted stage resumes with the same CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedCa {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl Wire for StagedCa {
    const KIND: FrameKind = FrameKind::Credential;
}

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("no cluster credential at {dir}: start a cluster with `keel up`, or pass --dir with the cluster directory")]
    NoCluster { dir: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path} is not a valid node address list: {cause}")]
    BadAddresses { path: String, cause: String },
}

#[derive(Serialize, Deserialize, Default)]
struct NodesFile {
    nodes: BTreeMap<u64, SocketAddr>,
}

/// A cluster directory.
#[derive(Clone, Debug)]
pub struct ClusterDir {
    root: PathBuf,
}

impl ClusterDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ClusterDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn node_dir(&self, node: u64) -> PathBuf {
        self.root.join(format!("node-{node}"))
    }

    fn admin_path(&self) -> PathBuf {
        self.root.join("admin.cred")
    }

    fn staged_ca_path(&self) -> PathBuf {
        self.root.join("staged-ca.cred")
    }

    pub fn load_staged_ca(&self) -> Result<Option<StagedCa>, DirError> {
        Ok(files::read(&self.staged_ca_path())?)
    }

    pub fn save_staged_ca(&self, staged: &StagedCa) -> Result<(), DirError> {
        Ok(files::write(&self.staged_ca_path(), staged)?)
    }

    pub fn remove_staged_ca(&self) -> Result<(), DirError> {
        match std::fs::remove_file(self.staged_ca_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FileError::Write {
                path: self.staged_ca_path().display().to_string(),
                source,
            }
            .into()),
        }
    }

    fn nodes_path(&self) -> PathBuf {
        self.root.join("nodes.json")
    }

    pub fn has_cluster(&self) -> bool {
        self.admin_path().exists()
    }

    pub fn load_admin(&self) -> Result<AdminCredential, DirError> {
        files::read(&self.admin_path())?.ok_or_else(|| DirError::NoCluster {
            dir: self.root.display().to_string(),
        })
    }

    pub fn save_admin(&self, credential: &AdminCredential) -> Result<(), DirError> {
        std::fs::create_dir_all(&self.root).map_err(|source| FileError::Write {
            path: self.root.display().to_string(),
            source,
        })?;
        Ok(files::write(&self.admin_path(), credential)?)
    }

    /// The known node addresses (empty if none were written yet).
    pub fn load_addresses(&self) -> Result<BTreeMap<NodeId, SocketAddr>, DirError> {
        let path = self.nodes_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(FileError::Read {
                    path: path.display().to_string(),
                    source,
                }
                .into())
            }
        };
        let bad = |cause: String| DirError::BadAddresses {
            path: path.display().to_string(),
            cause,
        };
        let file: NodesFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        file.nodes
            .into_iter()
            .map(|(id, addr)| Ok((NodeId::new(id).map_err(|e| bad(e.to_string()))?, addr)))
            .collect()
    }

    /// Records node addresses (merged over what is there).
    pub fn save_addresses(
        &self,
        addresses: impl IntoIterator<Item = (NodeId, SocketAddr)>,
    ) -> Result<(), DirError> {
        let mut file = NodesFile {
            nodes: self
                .load_addresses()?
                .into_iter()
                .map(|(id, addr)| (id.get(), addr))
                .collect(),
        };
        file.nodes
            .extend(addresses.into_iter().map(|(id, addr)| (id.get(), addr)));
        let path = self.nodes_path();
        let text = serde_json::to_string_pretty(&file).map_err(|e| DirError::BadAddresses {
            path: path.display().to_string(),
            cause: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|source| FileError::Write {
            path: path.display().to_string(),
            source,
        })?;
        Ok(())
    }
}
