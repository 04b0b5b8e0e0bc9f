//! Cluster version gates (DESIGN.md §3.2).
//!
//! The cluster version is replicated state: it only moves forward, through a
//! committed `ClusterVersionBump`, once every node runs a binary that knows
//! the new version. Features that change what goes into the log are gated on
//! it, so a new binary never writes an entry that an older binary still in
//! the cluster could not apply.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A cluster version. Totally ordered; only ever bumped forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterVersion(pub u32);

impl ClusterVersion {
    /// The first version: topology, routing, leases, tokens, migrations, plain DDL.
    pub const V1: ClusterVersion = ClusterVersion(1);
    /// Adds audited DDL (`CatalogDdlAudited`), whose audit records older
    /// binaries would not know how to hand to the host.
    pub const V2_AUDITED_DDL: ClusterVersion = ClusterVersion(2);
    /// The newest version this binary can run, and the one a new cluster starts at.
    pub const LATEST: ClusterVersion = Self::V2_AUDITED_DDL;

    /// Refuses to run a cluster whose version this binary does not know.
    pub fn check_supported(self) -> Result<(), VersionError> {
        if self <= Self::LATEST && self >= Self::V1 {
            Ok(())
        } else {
            Err(VersionError::Unsupported {
                cluster: self,
                binary_max: Self::LATEST,
            })
        }
    }
}

impl fmt::Display for ClusterVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum VersionError {
    #[error(
        "the cluster runs version {cluster} but this binary supports at most {binary_max}; \
         upgrade the binary"
    )]
    Unsupported {
        cluster: ClusterVersion,
        binary_max: ClusterVersion,
    },
    #[error(
        "version bump from {from} does not match the current cluster version {current}; \
         it was decided against a stale view"
    )]
    StaleBump {
        from: ClusterVersion,
        current: ClusterVersion,
    },
    #[error("version bump from {from} to {to} does not move forward")]
    NotForward {
        from: ClusterVersion,
        to: ClusterVersion,
    },
    #[error(
        "{what} needs cluster version {needed}, but the cluster runs {current}; bump it first"
    )]
    NotYetAllowed {
        what: String,
        needed: ClusterVersion,
        current: ClusterVersion,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_versions_are_refused() {
        assert!(ClusterVersion::LATEST.check_supported().is_ok());
        assert!(ClusterVersion::V1.check_supported().is_ok());
        assert!(ClusterVersion(0).check_supported().is_err());
        let err = ClusterVersion(ClusterVersion::LATEST.0 + 1)
            .check_supported()
            .unwrap_err();
        assert!(err.to_string().contains("upgrade the binary"));
    }
}
