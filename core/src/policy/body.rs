//! A request held for its body: the JSON-body attachment check, in the
//! mode that applies to it.

use super::{check_attached, Denied, Hold, Policy};
use crate::attribute::{Attribute, BodyValue, JsonBody, MAX_BODY_DEPTH};
use crate::config::Mode;
use crate::denial::{Denial, DenyCode, KeyLabel};
use crate::rules::{AttachmentCheck, Effect};

impl Policy {
    /// The key of a held request (for counting it once it is let through).
    pub fn held_key(&self, hold: Hold) -> Option<crate::keys::KeyRef<'_>> {
        self.keys.at(hold.record)
    }

    /// Finishes a held request: reads the attachment value from the buffered
    /// JSON body and checks it against the key. `truncated` means the body
    /// went over `max_body_bytes`.
    ///
    /// `Ok(None)`: forward it. `Ok(Some(_))`: forward it, reporting the
    /// refusal that shadow mode holds back. `Err(_)`: refuse it.
    pub fn decide_body(
        &self,
        hold: Hold,
        body: &[u8],
        truncated: bool,
    ) -> Result<Option<Denied<'_>>, Denied<'_>> {
        let Err(denial) = self.check_body(hold, body, truncated) else {
            return Ok(None);
        };
        let key = self.keys.at(hold.record);
        let denied = Denied {
            denial: Denial {
                grpc: hold.grpc,
                ..denial
            },
            key: key.map_or(KeyLabel::None, |k| KeyLabel::Id(k.id())),
        };
        let rule_mode = self.rules.get(hold.rule as usize).and_then(|r| r.mode);
        match key
            .and_then(|k| k.meta().mode)
            .or(rule_mode)
            .unwrap_or(self.mode)
        {
            Mode::Enforce => Err(denied),
            Mode::Shadow => Ok(Some(denied)),
        }
    }

    fn check_body(&self, hold: Hold, body: &[u8], truncated: bool) -> Result<(), Denial> {
        let key = self.keys.at(hold.record);
        let checks = self
            .rules
            .get(hold.rule as usize)
            .and_then(|r| match &r.effect {
                Effect::Require(req) => Some(req.attachments.as_slice()),
                _ => None,
            });
        let (Some(key), Some(checks)) = (key, checks) else {
            return Err(Denial::new(
                DenyCode::NotAttached,
                "held request lost its rule",
            ));
        };
        if truncated || body.len() > self.max_body_bytes {
            return Err(Denial::new(
                DenyCode::BodyTooLarge,
                "body over max_body_bytes",
            ));
        }
        let doc = JsonBody::parse(body).map_err(refusal)?;
        for check in checks {
            if let AttachmentCheck {
                set,
                attribute: Attribute::JsonBody(pointer),
            } = check
            {
                match doc.value_at(pointer) {
                    BodyValue::Found(v) => check_attached(key.meta(), set, &v)?,
                    why => return Err(refusal(why)),
                }
            }
        }
        Ok(())
    }
}

/// The refusal for a body value that could not be checked.
fn refusal(why: BodyValue) -> Denial {
    match why {
        BodyValue::TooDeep => {
            // The reason and the reply's message name the limit.
            const _: () = assert!(MAX_BODY_DEPTH == 127);
            Denial::new(
                DenyCode::InvalidJsonBody,
                "request body nests deeper than 127 levels",
            )
        }
        BodyValue::Missing => Denial::new(
            DenyCode::MissingAttribute,
            "attachment field absent from body",
        ),
        BodyValue::Duplicate => Denial::new(
            DenyCode::AmbiguousAttribute,
            "a field repeated in the JSON body, or the field beside a copy differing in case",
        ),
        BodyValue::NotJson | BodyValue::Found(_) => {
            Denial::new(DenyCode::InvalidJsonBody, "request body is not JSON")
        }
    }
}
