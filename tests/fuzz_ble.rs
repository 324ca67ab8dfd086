//! The BLE protocol parsers must refuse bad input with an error, never panic: lock adverts,
//! session values, notifications, cloud command lists, offline packets and BTHome adverts (with
//! and without keys). Random bytes and mutations of valid inputs, through proptest; valid inputs
//! must round-trip. `FUZZ_CASES=200000 cargo test --release --test fuzz_ble` runs longer.

use gatehouse::ble::bthome;
use gatehouse::ble::noke::{self, AppResult, HardwareKind, Notification};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000)
}

/// Flip, insert and delete bytes.
fn mutate(mut v: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(pos, byte, op) in edits {
        if v.is_empty() {
            v.push(byte);
            continue;
        }
        let pos = pos % v.len();
        match op % 3 {
            0 => v[pos] ^= byte | 1,
            1 => v.insert(pos, byte),
            _ => {
                v.remove(pos);
            }
        }
    }
    v
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..5)
}

const CODES: &[&str] = &[
    "2P", "3P", "2I", "4I", "2E", "3E", "4E", "1A", "3K", "4K", "1F", "2U", "9Z",
];

/// Plain BTHome objects the parser knows, as (id, value bytes); text/raw get a length byte.
fn bthome_object() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let fixed = prop::sample::select(vec![
        (0x00u8, 1usize),
        (0x01, 1),
        (0x02, 2),
        (0x03, 2),
        (0x04, 3),
        (0x0C, 2),
        (0x10, 1),
        (0x1A, 1),
        (0x21, 1),
        (0x2B, 1),
        (0x2D, 1),
        (0x2E, 1),
        (0x3A, 1),
        (0x3C, 2),
        (0x3E, 4),
        (0x45, 2),
        (0x4A, 2),
        (0x50, 4),
        (0x58, 1),
        (0x5B, 4),
    ])
    .prop_flat_map(|(id, len)| prop::collection::vec(any::<u8>(), len).prop_map(move |v| (id, v)));
    let prefixed = (
        prop::sample::select(vec![0x53u8, 0x54]),
        prop::collection::vec(any::<u8>(), 0..12),
    )
        .prop_map(|(id, v)| {
            let mut out = vec![u8::try_from(v.len()).unwrap_or(0)];
            out.extend(v);
            (id, out)
        });
    prop_oneof![4 => fixed, 1 => prefixed]
}

fn objects_bytes(objects: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, v) in objects {
        out.push(*id);
        out.extend_from_slice(v);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn adverts_never_panic(
        name in ".{0,24}",
        data in prop::collection::vec(any::<u8>(), 0..12),
        rssi in any::<Option<i16>>(),
    ) {
        if let Some(a) = noke::parse_advert(&name, &data, rssi) {
            prop_assert_eq!(a.hardware_code.len(), 2);
            prop_assert_eq!(a.flags, data.first().copied());
            prop_assert!(a.firmware.is_none() || data.len() >= 3);
            if let Some(mac) = &a.mac_from_name {
                prop_assert_eq!(mac.len(), 17);
            }
            prop_assert_eq!(a.rssi, rssi);
        }
    }

    #[test]
    fn well_formed_adverts_round_trip(
        prefix in prop::sample::select(vec!["NOKE", "NFOB", "FOB"]),
        code in prop::sample::select(CODES.to_vec()),
        mac in any::<[u8; 6]>(),
        data in prop::collection::vec(any::<u8>(), 0..8),
        edits in edits(),
    ) {
        let name = format!("{prefix}{code}_{}", hex::encode_upper(mac));
        let a = noke::parse_advert(&name, &data, Some(-70)).expect("well-formed name");
        prop_assert_eq!(&a.hardware_code, code);
        let expected_mac = mac.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        prop_assert_eq!(a.mac_from_name.as_deref(), Some(expected_mac.as_str()));
        if prefix == "NOKE" {
            prop_assert_eq!(a.hardware, HardwareKind::from_code(code));
        } else {
            prop_assert_eq!(a.hardware, HardwareKind::Fob);
        }
        if data.len() >= 3 {
            prop_assert_eq!(a.firmware, Some((data[1], data[2])));
        }
        // Mutated names: never panic (the bytes may stop being UTF-8: lossy).
        let mutated = String::from_utf8_lossy(&mutate(name.into_bytes(), &edits)).into_owned();
        let _ = noke::parse_advert(&mutated, &data, None);
    }

    #[test]
    fn sessions(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
        match noke::Session::parse(&bytes) {
            Ok(s) => {
                prop_assert_eq!(bytes.len(), 20);
                prop_assert_eq!(s.battery_mv(), u16::from_le_bytes([bytes[2], bytes[3]]));
                prop_assert_eq!(&s.as_bytes()[..], &bytes[..]);
                prop_assert_eq!(hex::decode(s.to_hex()).unwrap(), bytes);
            }
            Err(e) => prop_assert_eq!(e, noke::Error::SessionLength(bytes.len())),
        }
    }

    #[test]
    fn notifications_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
        match noke::parse_notification(&bytes) {
            Ok(Notification::Server(raw)) => prop_assert_eq!(raw[0], 0x50),
            Ok(Notification::Invalid(raw)) => prop_assert_eq!(raw[0], 0xFF),
            Ok(Notification::App { result, raw }) => {
                prop_assert_eq!(raw[0], 0x51);
                prop_assert_eq!(result.code(), raw[1]);
                prop_assert!(!result.event_name().is_empty());
            }
            Err(_) => prop_assert!(bytes.len() != 20 || ![0x50, 0x51, 0xFF].contains(&bytes[0])),
        }
    }

    #[test]
    fn app_packets_round_trip(code in any::<u8>(), a1 in any::<u8>(), a2 in any::<u8>()) {
        let r = AppResult::from_bytes(code, a1, a2);
        let p = r.to_packet();
        prop_assert_eq!(noke::parse_notification(&p), Ok(Notification::App { result: r, raw: p }));
        prop_assert_eq!(r.is_success(), code == 0x60);
    }

    #[test]
    fn command_lists_round_trip_and_mutations_never_panic(
        packets in prop::collection::vec(any::<[u8; 20]>(), 1..=noke::MAX_COMMAND_PACKETS),
        lower in any::<bool>(),
        edits in edits(),
    ) {
        let mut s = noke::format_command_packets(&packets);
        if lower {
            s = s.to_lowercase();
        }
        prop_assert_eq!(noke::parse_command_packets(&s), Ok(packets.clone()));
        let mutated = String::from_utf8_lossy(&mutate(s.into_bytes(), &edits)).into_owned();
        if let Ok(list) = noke::parse_command_packets(&mutated) {
            prop_assert!(!list.is_empty() && list.len() <= noke::MAX_COMMAND_PACKETS);
        }
    }

    #[test]
    fn command_lists_from_noise(s in "[0-9a-fA-F+ xZ]{0,200}") {
        if let Ok(list) = noke::parse_command_packets(&s) {
            prop_assert!(!list.is_empty() && list.len() <= noke::MAX_COMMAND_PACKETS);
        }
    }

    #[test]
    fn offline_packets_round_trip(
        key in any::<[u8; 16]>(),
        cmd in any::<[u8; 20]>(),
        session in any::<[u8; 20]>(),
        time in any::<u32>(),
    ) {
        let packet = noke::offline_unlock_packet(&key, &cmd, &session, time);
        prop_assert_eq!(&packet[..4], &cmd[..4]);
        let (header, plain, t) = noke::open_offline_packet(&key, &session, &packet).unwrap();
        prop_assert_eq!(&header[..], &cmd[..4]);
        prop_assert_eq!(t, time);
        prop_assert_eq!(&plain[..2], &cmd[4..6]);
        prop_assert_eq!(&plain[6..15], &cmd[10..19]);
    }

    #[test]
    fn offline_packets_from_noise_never_panic(
        key in any::<[u8; 16]>(),
        session in any::<[u8; 20]>(),
        bytes in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        match noke::open_offline_packet(&key, &session, &bytes) {
            Ok((header, plain, t)) => {
                prop_assert_eq!(&header[..], &bytes[..4]);
                prop_assert_eq!(t, u32::from_le_bytes([plain[2], plain[3], plain[4], plain[5]]));
            }
            Err(noke::Error::OfflinePacketLength(n)) => prop_assert!(n != 20 && n == bytes.len()),
            Err(e) => {
                let is_checksum = matches!(e, noke::Error::Checksum { .. });
                prop_assert!(is_checksum, "unexpected error {:?}", e);
            }
        }
    }

    #[test]
    fn bthome_noise_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        key in any::<[u8; 16]>(),
        mac in any::<[u8; 6]>(),
        v2 in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if v2 && !bytes.is_empty() {
            bytes[0] = (bytes[0] & 0x1F) | 0x40;
        }
        let _ = bthome::parse(&bytes, None, mac);
        let _ = bthome::parse(&bytes, Some(&key), mac);
    }

    #[test]
    fn bthome_plain_round_trips(
        mut objects in prop::collection::vec(bthome_object(), 0..8),
        trigger in any::<bool>(),
        edits in edits(),
    ) {
        objects.sort_by_key(|(id, _)| *id);
        let data = bthome::encode_plain(&objects_bytes(&objects), trigger);
        let r = bthome::parse(&data, None, [0; 6]).unwrap();
        prop_assert_eq!(r.trigger_based, trigger);
        prop_assert_eq!(r.unknown_object, None);
        prop_assert!(!r.out_of_order);
        prop_assert_eq!(
            r.objects.iter().map(|o| o.id).collect::<Vec<_>>(),
            objects.iter().map(|(id, _)| *id).collect::<Vec<_>>()
        );
        if let Some((_, v)) = objects.iter().find(|(id, _)| *id == 0x01) {
            prop_assert_eq!(r.battery, Some(v[0]));
        }
        let _ = bthome::parse(&mutate(data, &edits), None, [0; 6]);
    }

    #[test]
    fn bthome_encrypted_round_trips_and_refuses_any_flip(
        objects in prop::collection::vec(bthome_object(), 0..8),
        key in any::<[u8; 16]>(),
        mac in any::<[u8; 6]>(),
        counter in any::<u32>(),
        trigger in any::<bool>(),
        flip_at in any::<usize>(),
        flip in 1u8..=255,
        edits in edits(),
    ) {
        let plain_objects = objects_bytes(&objects);
        let data = bthome::encrypt(&plain_objects, &key, mac, counter, trigger).unwrap();
        let r = bthome::parse(&data, Some(&key), mac).unwrap();
        let p = bthome::parse(&bthome::encode_plain(&plain_objects, trigger), None, mac).unwrap();
        prop_assert!(r.encrypted);
        prop_assert_eq!(r.counter, Some(counter));
        prop_assert_eq!(&r.objects, &p.objects);
        prop_assert_eq!(r.battery, p.battery);
        prop_assert_eq!(r.door_open, p.door_open);
        prop_assert_eq!(r.button, p.button);
        prop_assert_eq!(bthome::parse(&data, None, mac), Err(bthome::Error::KeyRequired));

        // Any single flipped byte is refused (the MIC covers the payload, and the info byte and
        // counter are in the nonce); a forgery passes with probability 2^-32.
        let mut flipped = data.clone();
        let i = flip_at % flipped.len();
        flipped[i] ^= flip;
        prop_assert!(bthome::parse(&flipped, Some(&key), mac).is_err());
        let _ = bthome::parse(&mutate(data.clone(), &edits), Some(&key), mac);
        let _ = bthome::parse(&mutate(data, &edits), None, mac);
    }
}
