//! The role of a backend serving one VM on one host; it follows its VM's role in COLO.

use serde::{Deserialize, Serialize};

/// What a one-VM backend does with its VM's traffic (set by the VM's own colo-vmm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Not told yet: nothing the VM sends leaves, nothing from the LAN reaches it (fail-safe).
    Unset,
    /// The VM serves without a replica: a passthrough to the LAN (through the sequence
    /// rewriter if the VM took over as a secondary).
    Alone,
    /// The VM is the primary: inbound frames go to it and over the frame link to the
    /// secondary's backend; its output is compared with the secondary's and released.
    Primary,
    /// The VM is the secondary: it gets the primary's inbound frames over the frame link and
    /// its output goes back over it; nothing of it reaches this host's LAN.
    Secondary,
}

impl Role {
    /// The name in the control protocol.
    pub fn name(self) -> &'static str {
        match self {
            Role::Unset => "unset",
            Role::Alone => "alone",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "alone" => Ok(Role::Alone),
            "primary" => Ok(Role::Primary),
            "secondary" => Ok(Role::Secondary),
            _ => Err(format!("unknown role '{s}' (expected alone, primary or secondary)")),
        }
    }
}
