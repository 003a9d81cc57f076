//! Schema version 1 still decodes: the fixtures are bytes the last
//! version-1 build (main at 5390791) encoded, generated once and committed,
//! so these tests prove real old bytes decode, not bytes made by the kept
//! v1 types (which could drift with them). The events stream's old
//! `KeyCreated`s replay for ever; old agents' and clients' requests and
//! replies decode during a rolling upgrade.

use keysync_schemas::{
    decode, encode, Command, Envelope, Event, KeyAttributes, OpReply, OpRequest, Source,
    SCHEMA_VERSION,
};

const KEY_CREATED: &[u8] = include_bytes!("fixtures/v1-key-created.bin");
const CLONE_BATCH: &[u8] = include_bytes!("fixtures/v1-clone-batch.bin");
const OP_GENERATE: &[u8] = include_bytes!("fixtures/v1-op-generate.bin");
const OP_LIST: &[u8] = include_bytes!("fixtures/v1-op-list.bin");

fn v1_attributes() -> KeyAttributes {
    KeyAttributes {
        label: Some("payments".into()),
        app_id: None,
    }
}

#[test]
fn the_fixtures_are_version_1() {
    for bytes in [KEY_CREATED, CLONE_BATCH, OP_GENERATE, OP_LIST] {
        assert_eq!(&bytes[..4], b"KS\x00\x01");
    }
}

#[test]
fn a_version_1_key_created_decodes_with_no_app_id() {
    let env = decode::<Event>(KEY_CREATED).expect("a v1 KeyCreated decodes");
    assert_eq!(
        env.id.to_string(),
        "0190f1e2-3a4b-7c5d-8e6f-000000000001",
        "the envelope survives the upcast"
    );
    assert!(matches!(&env.source, Source::Hsm(h) if h.as_str() == "hsm-1"));
    let Event::KeyCreated(c) = &env.body else {
        panic!("not a KeyCreated: {:?}", env.body);
    };
    assert_eq!(c.key_id.to_string(), "0190f1e2-3a4b-7c5d-8e6f-0123456789ab");
    assert_eq!(c.attributes, v1_attributes());
    assert_eq!(c.wrapped, vec![0xa5; 40]);
    assert_eq!(c.public_key.as_deref(), Some(&[0x30, 0x59, 0x30, 0x13][..]));

    // Written again, it is version 2 and reads back the same.
    let again = encode(&env).expect("encodes");
    assert_eq!(u16::from_be_bytes([again[2], again[3]]), SCHEMA_VERSION);
    assert_eq!(decode::<Event>(&again).expect("decodes"), env);
    // Version 1 is not "any bytes": one byte less is malformed.
    assert!(decode::<Event>(&KEY_CREATED[..KEY_CREATED.len() - 1]).is_err());
}

#[test]
fn a_version_1_clone_batch_decodes() {
    let env = decode::<Command>(CLONE_BATCH).expect("a v1 CloneBatch decodes");
    let Command::CloneBatch(b) = env.body else {
        panic!("not a batch");
    };
    assert_eq!(b.target.as_str(), "hsm-2");
    assert_eq!(b.clones.len(), 1);
    assert_eq!(b.clones[0].created_seq, 7);
    assert_eq!(b.clones[0].key.attributes, v1_attributes());
}

#[test]
fn version_1_operations_decode() {
    let req = decode::<OpRequest>(OP_GENERATE).expect("a v1 Generate decodes");
    let OpRequest::Generate { attributes, .. } = req.body else {
        panic!("not a Generate");
    };
    assert_eq!(attributes, v1_attributes());
    let reply = decode::<OpReply>(OP_LIST).expect("a v1 List reply decodes");
    let OpReply::List(list) = reply.body else {
        panic!("not a List");
    };
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].attributes, v1_attributes());
}

#[test]
fn version_2_carries_the_app_id() {
    let env = decode::<Event>(KEY_CREATED).expect("decodes");
    let Event::KeyCreated(mut c) = env.body.clone() else {
        panic!("not a KeyCreated");
    };
    c.attributes.app_id = Some(vec![0x01, 0x02]);
    let v2 = Envelope {
        body: Event::KeyCreated(c),
        ..env
    };
    let bytes = encode(&v2).expect("encodes");
    assert_eq!(&bytes[..4], b"KS\x00\x02");
    assert_eq!(decode::<Event>(&bytes).expect("decodes"), v2);
    // A v2 body is not a v1 body: read as version 1 it does not decode
    // (the app id's bytes are left over).
    let mut as_v1 = bytes.clone();
    as_v1[3] = 1;
    assert!(decode::<Event>(&as_v1).is_err());
}
