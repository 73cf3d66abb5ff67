//! Attribute reading's unit tests: headers, query parameters and JSON
//! bodies, and the copies a backend could take for the attribute.

use super::*;
use crate::request::line;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn bodies_nesting_past_the_depth_limit_are_told_apart_from_broken_ones() {
    let at_c = JsonPointer::parse("/c");
    // The object holding "c" is one level; the arrays beside it the rest.
    let nested = |levels: usize| {
        let inner = levels - 1;
        format!(
            r#"{{"c":"c-17","x":{}{}}}"#,
            "[".repeat(inner),
            "]".repeat(inner)
        )
        .into_bytes()
    };
    assert_eq!(
        read_json_body(&nested(MAX_BODY_DEPTH), &at_c),
        BodyValue::Found("c-17".into())
    );
    assert_eq!(
        read_json_body(&nested(MAX_BODY_DEPTH + 1), &at_c),
        BodyValue::TooDeep
    );
    assert_eq!(read_json_body(&nested(5000), &at_c), BodyValue::TooDeep);
    // Unbalanced but shallow is still plain syntax.
    assert_eq!(read_json_body(br#"{"c":[[["#, &at_c), BodyValue::NotJson);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn attributes_from_header_query_and_body() {
    let (map, l) = line(&[
        (":path", "/x?campaign=c%2D17&other=1"),
        ("x-campaign", "c-42"),
    ]);
    assert_eq!(
        Attribute::Query("campaign".into()).read_from_request(&map, &l),
        AttrValue::Found("c-17".into())
    );
    assert_eq!(
        Attribute::Header(b"x-campaign".to_vec()).read_from_request(&map, &l),
        AttrValue::Found("c-42".into())
    );
    let (map, l) = line(&[
        (":path", "/x?campaign=c-17&campaign=c-99"),
        ("x-c", "a"),
        ("x-c", "b"),
    ]);
    assert_eq!(
        Attribute::Query("campaign".into()).read_from_request(&map, &l),
        AttrValue::Repeated
    );
    assert_eq!(
        Attribute::Header(b"x-c".to_vec()).read_from_request(&map, &l),
        AttrValue::Repeated
    );
    assert_eq!(
        Attribute::Header(b"x-d".to_vec()).read_from_request(&map, &l),
        AttrValue::Absent
    );
    let top = Attribute::from(&AttributeConfig::JsonBody("flo_campaign_id".into()));
    assert_eq!(
        top,
        Attribute::JsonBody(JsonPointer::parse("/flo_campaign_id"))
    );
    assert_eq!(
        read_json_body(
            br#"{"flo_campaign_id":"c-17"}"#,
            &JsonPointer::parse("/flo_campaign_id")
        ),
        BodyValue::Found("c-17".into())
    );
    assert_eq!(
        read_json_body(br#"{"a":{"b":[1,17]}}"#, &JsonPointer::parse("/a/b/1")),
        BodyValue::Found("17".into())
    );
    let at_c = JsonPointer::parse("/c");
    for (body, text) in [
        (&br#"{"c":17}"#[..], "17"),
        (br#"{"c":-3}"#, "-3"),
        (br#"{"c":17.0}"#, "17.0"),
        (br#"{"c":0.5}"#, "0.5"),
        (br#"{"c":-2.25}"#, "-2.25"),
        (br#"{"c":1e21}"#, "1000000000000000000000.0"),
        (br#"{"c":true}"#, "true"),
    ] {
        assert_eq!(read_json_body(body, &at_c), BodyValue::Found(text.into()));
    }
    assert_eq!(read_json_body(br#"{"c":null}"#, &at_c), BodyValue::Missing);
    assert_eq!(
        read_json_body(br#"{"a":1}"#, &JsonPointer::parse("/flo_campaign_id")),
        BodyValue::Missing
    );
    assert_eq!(
        read_json_body(br#"{"a":"#, &JsonPointer::parse("/a")),
        BodyValue::NotJson
    );
    assert_eq!(
        read_json_body(br#"{"a":null}"#, &JsonPointer::parse("/a")),
        BodyValue::Missing
    );
    assert_eq!(
        read_json_body(b"", &JsonPointer::parse("/a")),
        BodyValue::NotJson
    );
    assert_eq!(
        read_json_body(b"[1, 2", &JsonPointer::parse("/a")),
        BodyValue::NotJson
    );
    assert_eq!(
        read_json_body(b"\"text", &JsonPointer::parse("/a")),
        BodyValue::NotJson
    );
    // Which copy wins differs between parsers: refused wherever it is.
    assert_eq!(
        read_json_body(br#"{"a":"c-99","a":"c-17"}"#, &JsonPointer::parse("/a")),
        BodyValue::Duplicate
    );
    assert_eq!(
        read_json_body(
            br#"{"a":"c-17","x":[{"b":1,"b":2}]}"#,
            &JsonPointer::parse("/a")
        ),
        BodyValue::Duplicate
    );
    assert_eq!(
        read_json_body(
            br#"{"a":{"b":1.5e3,"c":[true,null,-2]}}"#,
            &JsonPointer::parse("/a/b")
        ),
        BodyValue::Found("1500.0".into())
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn copies_differing_in_case_are_ambiguous_on_the_path_read() {
    let dup =
        |body: &str, pointer: &str| read_json_body(body.as_bytes(), &JsonPointer::parse(pointer));
    assert_eq!(
        dup(r#"{"campaign":"c-17","CAMPAIGN":"c-99"}"#, "/campaign"),
        BodyValue::Duplicate
    );
    assert_eq!(
        dup(r#"{"Campaign":"c-99","campaign":"c-17"}"#, "/campaign"),
        BodyValue::Duplicate
    );
    // On the way to the field, too; the Kelvin sign folds to k, the long s to s.
    assert_eq!(
        dup(r#"{"o":{"k":"c-17"},"O":{"k":"c-99"}}"#, "/o/k"),
        BodyValue::Duplicate
    );
    assert_eq!(
        dup(r#"{"k":"c-17","\u212a":"c-99"}"#, "/k"),
        BodyValue::Duplicate
    );
    assert_eq!(
        dup(r#"{"\u017fid":"c-99","SID":"c-17"}"#, "/SID"),
        BodyValue::Duplicate
    );
    // Dotted and dotless i: encoding/json folds both to I.
    for other in [r"campa\u0131gn", r"CAMPA\u0130GN"] {
        let body = format!(r#"{{"campaign":"c-17","{other}":"c-99"}}"#);
        assert_eq!(dup(&body, "/campaign"), BodyValue::Duplicate, "{other}");
    }
    assert_eq!(
        dup(r#"{"campaign":"c-17","campa\u00efgn":"c-99"}"#, "/campaign"),
        BodyValue::Found("c-17".into())
    );
    // Elsewhere in the document, case variants are other fields.
    assert_eq!(
        dup(r#"{"campaign":"c-17","meta":{"x":1,"X":2}}"#, "/campaign"),
        BodyValue::Found("c-17".into())
    );
    // Only a case variant of the field: the field is absent.
    assert_eq!(
        dup(r#"{"CAMPAIGN":"c-17"}"#, "/campaign"),
        BodyValue::Missing
    );
    // Array indices as RFC 6901 has them; escapes in names.
    assert_eq!(dup(r#"{"a":[5,6]}"#, "/a/1"), BodyValue::Found("6".into()));
    assert_eq!(dup(r#"{"a":[5,6]}"#, "/a/01"), BodyValue::Missing);
    assert_eq!(dup(r#"{"a":[5,6]}"#, "/a/+1"), BodyValue::Missing);
    assert_eq!(
        dup(r#"{"a/b":{"c~d":7}}"#, "/a~1b/c~0d"),
        BodyValue::Found("7".into())
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn header_and_query_copies_count_across_spellings() {
    let (map, l) = line(&[
        (":path", "/?campaign=c-17&Campaign=c-99"),
        ("x-campaign", "c-17"),
        ("x_campaign", "c-99"),
    ]);
    assert_eq!(
        Attribute::Query("campaign".into()).read_from_request(&map, &l),
        AttrValue::Repeated
    );
    assert_eq!(
        Attribute::Header(b"x-campaign".to_vec()).read_from_request(&map, &l),
        AttrValue::Repeated
    );
    let (one, l) = line(&[(":path", "/?campaign=c-17"), ("X-Campaign", "c-17")]);
    // Another spelling alone is not the attribute.
    let (variant, vl) = line(&[(":path", "/?Campaign=c-17"), ("x_campaign", "c-17")]);
    assert_eq!(
        Attribute::Query("campaign".into()).read_from_request(&variant, &vl),
        AttrValue::Absent
    );
    assert_eq!(
        Attribute::Header(b"x-campaign".to_vec()).read_from_request(&variant, &vl),
        AttrValue::Absent
    );
    assert_eq!(
        Attribute::Header(b"x-campaign".to_vec()).read_from_request(&one, &l),
        AttrValue::Found("c-17".into())
    );
    assert_eq!(
        Attribute::Query("campaign".into()).read_from_request(&one, &l),
        AttrValue::Found("c-17".into())
    );
}
