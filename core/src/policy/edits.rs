//! What an allowed request changes before it is forwarded: the credential
//! to strip, client copies to remove, the identity and the forwarded key
//! fields (as headers, or as filter state for the route to write).

use crate::credential::{Credential, Extractor};
use crate::keys::KeyRef;

/// A key field forwarded to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardField {
    /// The key's id, for a key with a consumer (whose identity is the consumer).
    KeyId,
    /// `environment`.
    Environment,
    /// `scopes`, comma-separated.
    Scopes,
}

impl ForwardField {
    /// The filter state carrying this field with `"forward_with":
    /// "filter_state"` (`%FILTER_STATE(wasm.<name>:PLAIN)%` in Envoy).
    pub fn filter_state_name(self) -> &'static str {
        match self {
            ForwardField::KeyId => "keygate_key_id",
            ForwardField::Environment => "keygate_environment",
            ForwardField::Scopes => "keygate_scopes",
        }
    }
}

/// The filter state carrying the identity with `"forward_with": "filter_state"`.
pub const IDENTITY_FILTER_STATE: &str = "keygate_identity";

/// What the Envoy route must do for `"forward_with": "filter_state"`:
/// remove these headers, then add each header from its filter state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHeaders {
    /// Credential headers (when stripping), the identity header and every
    /// forwarded header, lowercase.
    pub remove: Vec<String>,
    /// `(header, filter-state name)`: the identity first, then the forwarded fields.
    pub add: Vec<(String, &'static str)>,
}

/// Header changes to make before forwarding an allowed request.
#[derive(Debug, Clone)]
pub struct Edits<'p, 'h> {
    /// The identity and forwarded fields go to filter state, not headers;
    /// the credential is left for the route to remove.
    pub to_filter_state: bool,
    /// Client copies of the identity header (any case, `_` for `-`) to remove.
    pub remove: Vec<&'h [u8]>,
    /// The credential whose headers [`Edits::strip`] names, when stripping.
    pub(super) strip: Option<(Credential<'h>, &'p Extractor)>,
    /// The identity header and its value (replaces any client copy); `None`
    /// on public routes.
    pub identity: Option<(&'p str, &'p str)>,
    /// The forwarded key fields' headers, and the key they come from.
    pub(super) forward: Option<(&'p [(String, ForwardField)], KeyRef<'p>)>,
}

impl<'p> Edits<'p, '_> {
    /// Credential headers to remove (none when credentials are kept). Named
    /// on demand rather than collected: an allowed request allocates nothing.
    pub fn strip(&self) -> impl Iterator<Item = &'p [u8]> + '_ {
        self.strip
            .iter()
            .flat_map(|(credential, extractor)| extractor.carrier_names(credential))
    }

    /// The forwarded key fields to set: `(header, value)`, for the fields
    /// the key has. Allocates only for scopes.
    pub fn metadata(&self) -> impl Iterator<Item = (&'p str, std::borrow::Cow<'p, str>)> + '_ {
        self.fields().map(|(header, _, value)| (header, value))
    }

    /// [`Edits::metadata`] with the field each value is: `(header, field, value)`.
    pub fn fields(
        &self,
    ) -> impl Iterator<Item = (&'p str, ForwardField, std::borrow::Cow<'p, str>)> + '_ {
        self.forward
            .into_iter()
            .flat_map(|(fields, key)| fields.iter().map(move |(h, f)| (h, *f, key)))
            .filter_map(|(header, field, key)| {
                let meta = key.meta();
                let value = match field {
                    ForwardField::KeyId => meta.consumer.as_ref().map(|_| key.id().into()),
                    ForwardField::Environment => meta.environment.as_deref().map(Into::into),
                    ForwardField::Scopes if meta.scopes.is_empty() => None,
                    ForwardField::Scopes => Some(meta.scopes.join(",").into()),
                };
                value.map(|v| (header.as_str(), field, v))
            })
    }
}
