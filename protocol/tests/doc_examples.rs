//! Every byte example in docs/protocol.md, checked against the reference
//! implementation: a wrong example in the doc fails here.
//!
//! The binary table's rows are `| → or ← | `JSON` | `len bytes` · `payload
//! bytes` |`; each row's JSON must decode as a client (→) or server (←)
//! message, encode to exactly the frame shown, and the frame must decode
//! back to it. Every line of the JSON example block must decode too.

use serde::Serialize;
use serde::de::DeserializeOwned;
use vramd_protocol::codec::ReadBuffer;
use vramd_protocol::{ClientMessage, Decoder, Encoding, ServerMessage, encode};

const DOC: &str = include_str!("../../docs/protocol.md");

/// Decimal bytes separated by spaces, in backticks, groups joined by `·`.
fn parse_frame(cell: &str) -> Vec<u8> {
    cell.split('·')
        .flat_map(|group| {
            group
                .trim()
                .trim_matches('`')
                .split_whitespace()
                .map(|b| {
                    b.parse::<u8>()
                        .unwrap_or_else(|e| panic!("byte {b:?} in {cell:?}: {e}"))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn check<T>(json: &str, frame: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let msg: T = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
    let encoded = encode(Encoding::Binary, &msg).expect("encode");
    assert_eq!(
        encoded, frame,
        "the doc's frame for {json} is wrong; the implementation sends {encoded:?}"
    );
    let mut buf = ReadBuffer::new();
    buf.extend(frame);
    let decoded = Decoder::new(Encoding::Binary)
        .decode::<T>(&mut buf)
        .expect("the doc's frame decodes")
        .expect("a whole frame");
    assert_eq!(decoded, msg, "{json}");
    assert!(buf.unread().is_empty(), "{json}: bytes left over");
    // Its JSON form is the JSON shown (field for field).
    let back: serde_json::Value = serde_json::to_value(&msg).unwrap();
    let shown: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(back, shown, "{json}: the JSON shown is not what is sent");
}

#[test]
fn every_binary_example_in_the_protocol_doc_is_what_the_code_sends() {
    let examples = DOC
        .split("## Binary encoding")
        .nth(1)
        .expect("a Binary encoding section");
    let mut checked = 0;
    for line in examples.lines() {
        let cells: Vec<&str> = line.split(" | ").collect();
        let (dir, json, frame) = match cells.as_slice() {
            [dir, json, frame] if dir.starts_with("| →") || dir.starts_with("| ←") => (
                dir.trim_start_matches('|').trim(),
                *json,
                frame.trim_end_matches('|'),
            ),
            _ => continue,
        };
        let json = json.trim().trim_matches('`');
        let bytes = parse_frame(frame);
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4,
            "the length prefix of {json}"
        );
        match dir {
            "→" => check::<ClientMessage>(json, &bytes),
            "←" => check::<ServerMessage>(json, &bytes),
            other => panic!("direction {other:?}"),
        }
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} examples found: was the table reformatted?"
    );
}

#[test]
fn every_json_example_in_the_protocol_doc_decodes() {
    let blocks: Vec<&str> = DOC
        .split("```jsonl")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect();
    assert!(blocks.len() >= 2, "the jsonl example blocks are gone");
    let mut checked = 0;
    for block in blocks {
        for line in block.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(json) = line.strip_prefix("→ ") {
                serde_json::from_str::<ClientMessage>(json)
                    .unwrap_or_else(|e| panic!("{json}: {e}"));
            } else if let Some(json) = line.strip_prefix("← ") {
                serde_json::from_str::<ServerMessage>(json)
                    .unwrap_or_else(|e| panic!("{json}: {e}"));
            } else if line.starts_with('…') {
                continue; // a comment between messages
            } else {
                panic!("a line without a direction: {line:?}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}

/// What the doc says of varints and zigzag beyond the examples: a value
/// too large for its type is an error, not truncated; `bool` is 0 or 1.
#[test]
fn the_doc_rules_on_overflow_and_bool_hold() {
    let decode = |payload: &[u8]| {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        let mut buf = ReadBuffer::new();
        buf.extend(&frame);
        Decoder::new(Encoding::Binary).decode::<ClientMessage>(&mut buf)
    };
    // hello with version 2^32 - 1 (5-byte varint), then with 2^33 - 1.
    assert_eq!(
        decode(&[0, 255, 255, 255, 255, 15, 0]).unwrap(),
        Some(ClientMessage::Hello {
            version: u32::MAX,
            client: String::new()
        })
    );
    assert!(decode(&[0, 255, 255, 255, 255, 31, 0]).is_err());
    // reserve with priority zigzag 2^32 - 1 = i32::MIN.
    let r = decode(&[1, 0, 1, 0, 255, 255, 255, 255, 15, 0, 0, 0]).unwrap();
    match r {
        Some(ClientMessage::Reserve(req)) => assert_eq!(req.priority, i32::MIN),
        other => panic!("{other:?}"),
    }
    // set_idle with idle = 2: not a bool.
    assert!(decode(&[7, 0, 1, 2]).is_err());
    assert!(decode(&[7, 0, 1, 1]).unwrap().is_some());
}
