//! Signed tracking links: click redirects, the open pixel and one-click unsubscribe.
//!
//! Every link carries its own data (workspace, message, target…) and an HMAC-SHA256 of it, so
//! the tracking endpoint needs no lookup to serve it and refuses anything it did not make: a
//! forged or edited click link can never turn it into an open redirect, and an unsubscribe
//! link cannot be altered to unsubscribe someone else.
//!
//! Token layout, before URL-safe base64 without padding:
//! `version (1 byte) | kind (1 byte) | payload | HMAC-SHA256(secret, version | kind | payload)`.
//! The kind is signed, so a token of one kind never verifies as another.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use relance_proto::v1::Channel;
use sha2::Sha256;
use uuid::Uuid;

use super::html::is_http_url;

type HmacSha256 = Hmac<Sha256>;

/// The token format's version; a new layout gets a new number so old links stay readable.
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;

/// What a link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Records a click and redirects to the target (`/c/{token}`).
    Click,
    /// Records an open and serves a 1×1 GIF (`/o/{token}.gif`).
    Open,
    /// Unsubscribes the customer from a topic on a channel (`/u/{token}`).
    Unsubscribe,
}

impl LinkKind {
    fn byte(self) -> u8 {
        match self {
            LinkKind::Click => b'c',
            LinkKind::Open => b'o',
            LinkKind::Unsubscribe => b'u',
        }
    }
}

/// What a verified link says, beyond its workspace and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkAction {
    /// Redirect to this http(s) URL.
    Click { target: String },
    /// The message was opened.
    Open,
    /// Unsubscribe this customer from `topic` on `channel`.
    Unsubscribe {
        customer_id: String,
        channel: Channel,
        topic: String,
    },
}

/// A verified link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The workspace the message belongs to.
    pub workspace: String,
    /// The ledger's id of the message the link was in.
    pub message_id: Uuid,
    /// What it does.
    pub action: LinkAction,
}

/// Why a link was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Not a token this service could have made (bad encoding, truncated, trailing bytes).
    #[error("malformed link")]
    Malformed,
    /// A token format this service does not know.
    #[error("unknown link version")]
    UnknownVersion,
    /// A valid token of another kind (e.g. a click link on the unsubscribe endpoint).
    #[error("wrong kind of link")]
    WrongKind,
    /// The signature does not match: tampered with, or signed with another secret.
    #[error("bad link signature")]
    BadSignature,
    /// Only http and https URLs can be click targets.
    #[error("only http(s) URLs can be tracked")]
    NotHttp,
}

/// Makes and checks tracking links for one public base URL.
#[derive(Clone)]
pub struct LinkSigner {
    key: HmacSha256,
    base: String,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("LinkSigner")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl LinkSigner {
    /// A signer with this secret, making links under `public_base_url` (e.g.
    /// `https://t.shop.example`; a trailing slash is dropped).
    pub fn new(secret: &[u8], public_base_url: &str) -> LinkSigner {
        LinkSigner {
            key: hmac_key(secret),
            base: public_base_url.trim_end_matches('/').to_string(),
        }
    }

    /// The base URL links are made under, without trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A click link redirecting to `target`, which must be an http(s) URL.
    pub fn click_url(
        &self,
        workspace: &str,
        message_id: Uuid,
        target: &str,
    ) -> Result<String, LinkError> {
        let target = target.trim();
        if !is_http_url(target) {
            return Err(LinkError::NotHttp);
        }
        let mut payload = common_payload(workspace, message_id);
        put_bytes(&mut payload, target.as_bytes());
        Ok(format!(
            "{}/c/{}",
            self.base,
            self.token(LinkKind::Click, &payload)
        ))
    }

    /// The open-tracking pixel's URL.
    pub fn open_url(&self, workspace: &str, message_id: Uuid) -> String {
        let payload = common_payload(workspace, message_id);
        format!(
            "{}/o/{}.gif",
            self.base,
            self.token(LinkKind::Open, &payload)
        )
    }

    /// A one-click unsubscribe link (also the `List-Unsubscribe` header's URL).
    pub fn unsubscribe_url(
        &self,
        workspace: &str,
        message_id: Uuid,
        customer_id: &str,
        channel: Channel,
        topic: &str,
    ) -> String {
        let mut payload = common_payload(workspace, message_id);
        put_bytes(&mut payload, customer_id.as_bytes());
        put_varint(&mut payload, u64::from(channel as i32 as u32));
        put_bytes(&mut payload, topic.as_bytes());
        format!(
            "{}/u/{}",
            self.base,
            self.token(LinkKind::Unsubscribe, &payload)
        )
    }

    /// Checks a token taken from the path of a `kind` link (the open pixel's `.gif` suffix
    /// may be left on) and returns what it says.
    pub fn verify(&self, kind: LinkKind, token: &str) -> Result<Link, LinkError> {
        let token = match kind {
            LinkKind::Open => token.strip_suffix(".gif").unwrap_or(token),
            _ => token,
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| LinkError::Malformed)?;
        if bytes.len() < 2 + MAC_LEN {
            return Err(LinkError::Malformed);
        }
        if bytes[0] != VERSION {
            return Err(LinkError::UnknownVersion);
        }
        let (signed, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut check = self.key.clone();
        check.update(signed);
        // Constant-time: a timing difference would let an attacker forge a MAC byte by byte.
        check
            .verify_slice(mac)
            .map_err(|_| LinkError::BadSignature)?;
        // The kind is checked after the signature so that an unsigned token learns nothing.
        if signed[1] != kind.byte() {
            return Err(LinkError::WrongKind);
        }
        let mut reader = Reader {
            bytes: &signed[2..],
        };
        let workspace = reader.string()?;
        let message_id = Uuid::from_bytes(reader.array()?);
        let action = match kind {
            LinkKind::Click => {
                let target = reader.string()?;
                // Signed links only ever hold http(s) targets; refuse anything else anyway.
                if !is_http_url(&target) {
                    return Err(LinkError::NotHttp);
                }
                LinkAction::Click { target }
            }
            LinkKind::Open => LinkAction::Open,
            LinkKind::Unsubscribe => {
                let customer_id = reader.string()?;
                let channel = reader.varint()?;
                let channel = i32::try_from(channel)
                    .ok()
                    .and_then(|c| Channel::try_from(c).ok())
                    .ok_or(LinkError::Malformed)?;
                let topic = reader.string()?;
                LinkAction::Unsubscribe {
                    customer_id,
                    channel,
                    topic,
                }
            }
        };
        if !reader.bytes.is_empty() {
            return Err(LinkError::Malformed);
        }
        Ok(Link {
            workspace,
            message_id,
            action,
        })
    }

    fn token(&self, kind: LinkKind, payload: &[u8]) -> String {
        let mut bytes = Vec::with_capacity(2 + payload.len() + MAC_LEN);
        bytes.push(VERSION);
        bytes.push(kind.byte());
        bytes.extend_from_slice(payload);
        let mut mac = self.key.clone();
        mac.update(&bytes);
        bytes.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// The HMAC key for `secret`, prepared as RFC 2104 does (a secret longer than SHA-256's
/// 64-byte block is hashed first, a shorter one padded with zeros), so that building it is
/// infallible instead of going through `new_from_slice`'s `Result`.
fn hmac_key(secret: &[u8]) -> HmacSha256 {
    let mut block = [0u8; 64];
    if secret.len() > block.len() {
        let digest = <Sha256 as sha2::Digest>::digest(secret);
        block[..digest.len()].copy_from_slice(&digest);
    } else {
        block[..secret.len()].copy_from_slice(secret);
    }
    <HmacSha256 as hmac::digest::KeyInit>::new(&block.into())
}

fn common_payload(workspace: &str, message_id: Uuid) -> Vec<u8> {
    let mut payload = Vec::with_capacity(64 + workspace.len());
    put_bytes(&mut payload, workspace.as_bytes());
    payload.extend_from_slice(message_id.as_bytes());
    payload
}

/// Length-prefixed bytes; the length is a LEB128 varint so short strings cost one byte and
/// no length is ever too long to encode.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, LinkError> {
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let (&byte, rest) = self.bytes.split_first().ok_or(LinkError::Malformed)?;
            self.bytes = rest;
            if shift > 56 {
                return Err(LinkError::Malformed);
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    fn string(&mut self) -> Result<String, LinkError> {
        let len = usize::try_from(self.varint()?).map_err(|_| LinkError::Malformed)?;
        if len > self.bytes.len() {
            return Err(LinkError::Malformed);
        }
        let (text, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        String::from_utf8(text.to_vec()).map_err(|_| LinkError::Malformed)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], LinkError> {
        if self.bytes.len() < N {
            return Err(LinkError::Malformed);
        }
        let (head, rest) = self.bytes.split_at(N);
        self.bytes = rest;
        let mut array = [0u8; N];
        array.copy_from_slice(head);
        Ok(array)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn signer() -> LinkSigner {
        LinkSigner::new(b"a secret of the workspace", "https://t.shop.example/")
    }

    fn token_of(url: &str) -> &str {
        url.rsplit('/').next().unwrap()
    }

    #[test]
    fn click_round_trip() {
        let signer = signer();
        let id = Uuid::now_v7();
        let url = signer
            .click_url("ws-1", id, "https://shop.example/cart?a=1&b=é")
            .unwrap();
        assert!(url.starts_with("https://t.shop.example/c/"), "{url}");
        let token = token_of(&url);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let link = signer.verify(LinkKind::Click, token).unwrap();
        assert_eq!(
            link,
            Link {
                workspace: "ws-1".into(),
                message_id: id,
                action: LinkAction::Click {
                    target: "https://shop.example/cart?a=1&b=é".into()
                },
            }
        );
    }

    #[test]
    fn open_and_unsubscribe_round_trip() {
        let signer = LinkSigner::new(b"k", "http://127.0.0.1:9090");
        let id = Uuid::new_v4();
        let url = signer.open_url("ws", id);
        assert!(url.starts_with("http://127.0.0.1:9090/o/") && url.ends_with(".gif"));
        let link = signer.verify(LinkKind::Open, token_of(&url)).unwrap();
        assert_eq!(link.action, LinkAction::Open);
        assert_eq!(link.message_id, id);
        let without_suffix = token_of(&url).trim_end_matches(".gif");
        assert!(signer.verify(LinkKind::Open, without_suffix).is_ok());

        let url = signer.unsubscribe_url("ws", id, "cust-42", Channel::Email, "marketing");
        assert!(url.starts_with("http://127.0.0.1:9090/u/"));
        let link = signer
            .verify(LinkKind::Unsubscribe, token_of(&url))
            .unwrap();
        assert_eq!(
            link.action,
            LinkAction::Unsubscribe {
                customer_id: "cust-42".into(),
                channel: Channel::Email,
                topic: "marketing".into()
            }
        );
        assert_eq!(link.workspace, "ws");
    }

    #[test]
    fn only_http_targets_are_signed() {
        let signer = signer();
        let id = Uuid::new_v4();
        for target in [
            "javascript:alert(1)",
            "mailto:a@b.c",
            "//evil.example",
            "ftp://x",
            "",
        ] {
            assert_eq!(
                signer.click_url("ws", id, target),
                Err(LinkError::NotHttp),
                "{target}"
            );
        }
        assert!(signer.click_url("ws", id, "HTTP://shop.example").is_ok());
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let signer = signer();
        let id = Uuid::new_v4();
        let url = signer
            .click_url("ws", id, "https://shop.example/a")
            .unwrap();
        let token = token_of(&url).to_string();
        let bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();

        // Every flipped byte is refused.
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x01;
            let result = signer.verify(LinkKind::Click, &URL_SAFE_NO_PAD.encode(&flipped));
            assert!(result.is_err(), "byte {i} flipped was accepted");
        }

        // A changed target, re-encoded with the old signature.
        let mut changed = bytes.clone();
        let at = changed
            .windows(b"shop".len())
            .position(|w| w == b"shop")
            .unwrap();
        changed[at..at + 4].copy_from_slice(b"evil");
        assert_eq!(
            signer.verify(LinkKind::Click, &URL_SAFE_NO_PAD.encode(&changed)),
            Err(LinkError::BadSignature)
        );

        // Another secret.
        let other = LinkSigner::new(b"another secret", "https://t.shop.example");
        assert_eq!(
            other.verify(LinkKind::Click, &token),
            Err(LinkError::BadSignature)
        );

        // Truncated tokens.
        for len in [0, 1, 10, token.len() - 1, token.len() - 4] {
            assert!(
                signer.verify(LinkKind::Click, &token[..len]).is_err(),
                "{len}"
            );
        }

        // Garbage.
        assert_eq!(
            signer.verify(LinkKind::Click, "not a token!"),
            Err(LinkError::Malformed)
        );

        // A click token used as another kind.
        assert_eq!(
            signer.verify(LinkKind::Unsubscribe, &token),
            Err(LinkError::WrongKind)
        );
        assert_eq!(
            signer.verify(LinkKind::Open, &token),
            Err(LinkError::WrongKind)
        );
        let open = signer.open_url("ws", id);
        assert_eq!(
            signer.verify(LinkKind::Click, token_of(&open).trim_end_matches(".gif")),
            Err(LinkError::WrongKind)
        );
    }

    #[test]
    fn key_preparation_matches_hmac() {
        use hmac::digest::KeyInit;
        for secret in [&b""[..], b"short", &[7u8; 64], &[9u8; 65], &[1u8; 200]] {
            let mut ours = hmac_key(secret);
            let mut reference = <HmacSha256 as KeyInit>::new_from_slice(secret).unwrap();
            ours.update(b"payload");
            reference.update(b"payload");
            assert_eq!(
                ours.finalize().into_bytes(),
                reference.finalize().into_bytes()
            );
        }
    }

    #[test]
    fn signer_debug_hides_the_key() {
        let shown = format!("{:?}", signer());
        assert!(shown.contains("t.shop.example"));
        assert!(!shown.contains("secret"));
    }
}
