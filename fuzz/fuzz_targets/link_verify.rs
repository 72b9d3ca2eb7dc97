//! The signed-link verifier: `LinkSigner::verify` on the tokens of click, open and
//! unsubscribe links (what `/c/{token}`, `/o/{token}.gif` and `/u/{token}` run).
//!
//! The first byte picks the kind (its value mod 3) and what the rest is:
//! - `< 0x80`: a token as taken from the URL path (what an attacker can send);
//! - `>= 0x80`: the bytes a token holds before its MAC (`version | kind | payload`), signed
//!   here with the service's secret, so that the payload reader past the signature check is
//!   reached too.
//!
//! A token must never panic; one that verifies must say what a link made by the signer for
//! the same data would say, and a tampered token must not verify.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use libfuzzer_sys::fuzz_target;
use relance_delivery::domain::links::{Link, LinkAction, LinkKind, LinkSigner};
use sha2::Sha256;

const SECRET: &[u8] = b"fuzzing-secret-of-the-link-signer";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let kind = match mode % 3 {
        0 => LinkKind::Click,
        1 => LinkKind::Open,
        _ => LinkKind::Unsubscribe,
    };
    let signer = LinkSigner::new(SECRET, "https://t.shop.example/");
    let token = if mode < 0x80 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        sign(rest)
    };
    let Ok(link) = signer.verify(kind, &token) else {
        return;
    };
    // What verified must be what the signer makes for the same data (which trims a click
    // target's spaces: a token signed here need not)…
    let remade = remake(&signer, &link);
    let mut expected = link.clone();
    if let LinkAction::Click { target } = &mut expected.action {
        *target = target.trim().to_owned();
    }
    let remade_token = remade
        .rsplit('/')
        .next()
        .expect("a link has a path")
        .to_owned();
    assert_eq!(signer.verify(kind, &remade_token), Ok(expected));
    // …and another secret or one flipped bit must not verify.
    let other = LinkSigner::new(b"another secret", "https://t.shop.example");
    assert!(other.verify(kind, &token).is_err());
    let mut bytes = URL_SAFE_NO_PAD
        .decode(token.strip_suffix(".gif").unwrap_or(&token))
        .expect("a verified token is base64");
    let at = usize::from(mode) % bytes.len();
    bytes[at] ^= 0x01;
    assert!(
        signer
            .verify(kind, &URL_SAFE_NO_PAD.encode(&bytes))
            .is_err()
    );
});

/// `signed` followed by its HMAC-SHA256 under [`SECRET`], as URL-safe base64.
fn sign(signed: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
    mac.update(signed);
    let mut bytes = signed.to_vec();
    bytes.extend_from_slice(&mac.finalize().into_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn remake(signer: &LinkSigner, link: &Link) -> String {
    match &link.action {
        LinkAction::Click { target } => signer
            .click_url(&link.workspace, link.message_id, target)
            .expect("a verified click target is http(s)"),
        LinkAction::Open => signer.open_url(&link.workspace, link.message_id),
        LinkAction::Unsubscribe {
            customer_id,
            channel,
            topic,
        } => signer.unsubscribe_url(
            &link.workspace,
            link.message_id,
            customer_id,
            *channel,
            topic,
        ),
    }
}
