//! Lookup keys and enumeration filters, as virsh takes them.

/// How an object is named in a lookup (libvirt's LookupByName / ByUUID / ByID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    Name(&'a str),
    Uuid(uuid::Uuid),
    Id(u32),
}

impl<'a> Lookup<'a> {
    /// virsh's rule for domains: a number is an ID, then a UUID, else a name.
    pub fn domain(text: &'a str) -> Self {
        if let Ok(id) = text.parse::<u32>() {
            return Self::Id(id);
        }
        Self::object(text)
    }

    /// For networks and pools: a UUID, else a name.
    pub fn object(text: &'a str) -> Self {
        match uuid::Uuid::parse_str(text) {
            Ok(u) if text.len() >= 32 => Self::Uuid(u),
            _ => Self::Name(text),
        }
    }

    /// The text to put in a "not found" message.
    pub fn describe(&self) -> String {
        match self {
            Self::Name(n) => (*n).to_string(),
            Self::Uuid(u) => u.to_string(),
            Self::Id(i) => i.to_string(),
        }
    }
}

/// Which objects an enumeration returns (virsh's `--all`, `--inactive`, default active).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ListFilter {
    #[default]
    All,
    Active,
    Inactive,
}

impl ListFilter {
    pub fn accepts(self, active: bool) -> bool {
        match self {
            Self::All => true,
            Self::Active => active,
            Self::Inactive => !active,
        }
    }
}
