//! The DICOM node's door against hostile and careless peers (issue #43, rows 2, 3 and
//! 14, and the core's shared budgets): the real `cxr-serve`, dcmtk's echoscu and
//! findscu as the well-behaved peers, raw sockets and a dicom-ul client as the
//! attacker (no DICOM tool sends what an attacker sends).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::{ClientAssociation, ClientAssociationOptions, Pdu};

use super::harness::{Node, assert_metrics};
use super::{common, dcmtk, instances};

const CR: &str = "1.2.840.10008.5.1.4.1.1.1";
const VERIFICATION: &str = "1.2.840.10008.1.1";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// A node whose only peer is `MODALITY`, with `extra` flags, in a folder of its
/// own (`dir`).
struct Door {
    server: common::Server,
    port: u16,
    _models: tempfile::TempDir,
    dir: tempfile::TempDir,
}

impl Door {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let models = common::models_dir();
        let (server, port) = Node::new(dir.path())
            .flag("--dicom-ae-title", "CXR")
            // Results wait in the outbox: nothing listens there.
            .flag("--dicom-destination", "ORTHANC@127.0.0.1:9")
            .outbox(&dir.path().join("outbox.sqlite"))
            .flags(extra)
            .start(models.path());
        Self {
            server,
            port,
            _models: models,
            dir,
        }
    }

    /// The radiographs of [`instances`], in the node's folder.
    fn instances(&self) -> std::path::PathBuf {
        instances(self.dir.path())
    }
}

/// dcmtk's `tool` as `MODALITY` calling `CXR` on `port`, with 5 s timeouts and
/// `extra` arguments.
fn scu(tool: &str, port: u16, extra: &[&str]) -> std::process::Output {
    let port = port.to_string();
    let mut args = vec![
        "-aet", "MODALITY", "-aec", "CXR", "-to", "5", "-ta", "5", "-td", "5",
    ];
    args.extend(extra);
    args.extend(["127.0.0.1", port.as_str()]);
    dcmtk(tool, &args)
}

fn echo(port: u16) -> std::process::Output {
    scu("echoscu", port, &[])
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An association of `MODALITY` proposing Verification and CR storage (explicit VR
/// little endian).
fn associate(port: u16) -> ClientAssociation<TcpStream> {
    ClientAssociationOptions::new()
        .calling_ae_title("MODALITY")
        .called_ae_title("CXR")
        .with_presentation_context(VERIFICATION, vec![IMPLICIT_LE])
        .with_presentation_context(CR, vec![EXPLICIT_LE])
        .read_timeout(Duration::from_secs(20))
        .establish_with(&format!("CXR@127.0.0.1:{port}"))
        .expect("a listed peer associates")
}

/// The accepted context's id for `abstract_syntax`.
fn context(a: &ClientAssociation<TcpStream>, abstract_syntax: &str) -> u8 {
    a.presentation_contexts()
        .iter()
        .find(|pc| pc.abstract_syntax == abstract_syntax)
        .expect("the context was accepted")
        .id
}

/// A command set (implicit VR little endian, with its group length).
fn command(field: u16, sop_class: &str, sop_instance: &str, data_set: bool) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(field)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(if data_set { 0x0000u16 } else { 0x0101 }),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
    ]);
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts).unwrap();
    out
}

/// Sends a whole command set (see [`command`]) on `context`.
fn send_command(
    a: &mut ClientAssociation<TcpStream>,
    context: u8,
    field: u16,
    sop_class: &str,
    sop_instance: &str,
    data_set: bool,
) -> Result<(), dicom_ul::association::Error> {
    a.send(&pdata(
        context,
        true,
        true,
        command(field, sop_class, sop_instance, data_set),
    ))
}

fn pdata(context: u8, command: bool, is_last: bool, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: context,
            value_type: if command {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last,
            data,
        }],
    }
}

/// Sends `data` as data-set fragments of 16 KiB, the last one `last`.
fn send_data(a: &mut ClientAssociation<TcpStream>, context: u8, data: &[u8], last: bool) {
    let chunks: Vec<&[u8]> = data.chunks(16 * 1024).collect();
    for (i, c) in chunks.iter().enumerate() {
        let is_last = last && i + 1 == chunks.len();
        a.send(&pdata(context, false, is_last, c.to_vec())).unwrap();
    }
}

/// The next response: its command field and status.
fn response(a: &mut ClientAssociation<TcpStream>) -> (u16, u16) {
    match a.receive().expect("a response") {
        Pdu::PData { data } => {
            let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
            let obj = InMemDicomObject::read_dataset_with_ts(&data[0].data[..], &ts).unwrap();
            let get = |tag| obj.element(tag).unwrap().to_int::<u16>().unwrap();
            (get(tags::COMMAND_FIELD), get(tags::STATUS))
        }
        other => panic!("not a response: {other:?}"),
    }
}

/// A file's SOP Instance UID, SOP Class UID and data set (explicit VR little endian).
fn data_set(file: &Path) -> (String, String, Vec<u8>) {
    let obj = dicom_object::open_file(file).unwrap();
    let uid = |tag| {
        obj.element(tag)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_string()
    };
    let (instance, class) = (uid(tags::SOP_INSTANCE_UID), uid(tags::SOP_CLASS_UID));
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts).unwrap();
    (instance, class, out)
}

/// C-STOREs `file`'s data set on the CR context (whatever its SOP class); the
/// response's status.
fn store_on_cr_context(port: u16, file: &Path) -> u16 {
    let mut a = associate(port);
    let ctx = context(&a, CR);
    let (instance, class, data) = data_set(file);
    send_command(&mut a, ctx, 0x0001, &class, &instance, true).unwrap();
    send_data(&mut a, ctx, &data, true);
    let (field, status) = response(&mut a);
    assert_eq!(field, 0x8001);
    let _ = a.release();
    status
}

/// [`store_on_cr_context`], answered `want`.
fn assert_store_status(port: u16, file: &Path, want: u16) {
    let status = store_on_cr_context(port, file);
    assert_eq!(status, want, "status {status:04X}");
}

/// What a raw socket reads within `secs`: the bytes, until the node closes.
fn read_for(s: &mut TcpStream, secs: u64) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Row 2: connections that never finish their A-ASSOCIATE-RQ (one byte, then
/// silence; or nothing) hold no association slot — a listed peer's C-ECHO still succeeds with
/// every slot's worth of them open — and each is aborted (an A-ABORT PDU) once
/// --dicom-negotiation-timeout-s passes, not left open.
#[test]
fn trickling_connections_hold_no_association_slot_and_are_aborted_in_time() {
    let door = Door::start(&[
        "--dicom-max-associations",
        "2",
        "--dicom-negotiation-timeout-s",
        "3",
    ]);
    let (server, port) = (&door.server, door.port);
    // Three send the first byte of an A-ASSOCIATE-RQ, one nothing at all.
    let mut tricklers: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            if i > 0 {
                s.write_all(&[0x01]).unwrap();
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = echo(port);
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
    for s in &mut tricklers {
        let got = read_for(s, 10);
        // A-ABORT: PDU type 07H, length 4.
        assert_eq!(got.first(), Some(&0x07), "{got:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_metrics(
        server,
        &["cxr_dicom_associations_total{outcome=\"timed_out\"} 4"],
    );
}

/// A connection to the node from `source` (a loopback address of its own).
fn connect_from(source: &str, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(format!("{source}:0").parse().unwrap())?;
            socket
                .connect(format!("127.0.0.1:{port}").parse().unwrap())
                .await
        })
        .unwrap()
        .into_std()
        .unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

/// Row 2: one host cannot fill the negotiating pool: past its quarter of
/// --dicom-max-negotiating, its stalling connections are refused at once (a
/// transient A-ASSOCIATE-RJ), and a peer on another host still associates.
#[test]
fn one_host_gets_a_quarter_of_the_negotiating_pool() {
    let door = Door::start(&["--dicom-max-negotiating", "8"]);
    let (server, port) = (&door.server, door.port);
    let mut stalling: Vec<TcpStream> = (0..4).map(|_| connect_from("127.0.0.2", port)).collect();
    // The first two negotiate (nothing comes back yet); the others are refused.
    for (i, s) in stalling.iter_mut().enumerate() {
        let got = read_for(s, 1);
        if i < 2 {
            assert!(got.is_empty(), "{i}: {got:?}");
        } else {
            // A-ASSOCIATE-RJ: type 03H, result 2 (transient), source 3, reason 2.
            assert_eq!(got, [0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2], "{i}");
        }
    }
    let out = echo(port);
    assert!(out.status.success(), "{}", text(&out));
    assert_metrics(
        server,
        &["cxr_dicom_associations_total{outcome=\"busy\"} 2"],
    );
}

/// Row 2: a listed peer over --dicom-max-associations is told so at once with a
/// transient A-ASSOCIATE-RJ (local limit exceeded), not closed in silence.
#[test]
fn a_peer_over_the_association_limit_gets_a_transient_reject() {
    let door = Door::start(&["--dicom-max-associations", "1"]);
    let (server, port) = (&door.server, door.port);
    let held = associate(port);
    let out = echo(port);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("Association Rejected"), "{said}");
    assert!(said.contains("Transient"), "{said}");
    assert!(said.contains("Local Limit Exceeded"), "{said}");
    assert_metrics(
        server,
        &["cxr_dicom_associations_total{outcome=\"busy\"} 1"],
    );
    held.release().unwrap();
    // The slot is free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !echo(port).status.success() {
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Row 2: an association that keeps itself busy (a C-ECHO a second) still ends at
/// --dicom-association-timeout-s, with an A-ABORT.
#[test]
fn an_association_is_aborted_at_its_deadline_however_busy() {
    let door = Door::start(&["--dicom-association-timeout-s", "3"]);
    let (server, port) = (&door.server, door.port);
    let mut a = associate(port);
    let ctx = context(&a, VERIFICATION);
    let started = Instant::now();
    let ended = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still associated after 15 s"
        );
        // (A send after the node closed may fail; its A-ABORT is read all the same.)
        let sent = send_command(&mut a, ctx, 0x0030, VERIFICATION, "", false).is_ok();
        match a.receive() {
            Ok(Pdu::PData { .. }) if sent => std::thread::sleep(Duration::from_secs(1)),
            Ok(other) => break Some(other),
            Err(_) => break None,
        }
    };
    assert!(
        matches!(ended, Some(Pdu::AbortRQ { .. })),
        "ended by {ended:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_metrics(server, &["cxr_dicom_aborts_total{reason=\"deadline\"} 1"]);
}

/// Row 3: command fragments without an end are not buffered past 64 KiB: the
/// association is aborted at once, and counted.
#[test]
fn endless_command_fragments_are_aborted_at_the_cap() {
    let door = Door::start(&[]);
    let (server, port) = (&door.server, door.port);
    let mut a = associate(port);
    let ctx = context(&a, CR);
    // An attacker sends on (1 MiB) past the 64 KiB the node reads; its A-ABORT is
    // read all the same.
    for _ in 0..64 {
        if a.send(&pdata(ctx, true, false, vec![0u8; 16 * 1024]))
            .is_err()
        {
            break;
        }
    }
    let ended = a.receive().ok();
    assert!(
        matches!(ended, Some(Pdu::AbortRQ { .. })),
        "ended by {ended:?}"
    );
    assert_metrics(
        server,
        &["cxr_dicom_aborts_total{reason=\"command_too_large\"} 1"],
    );
}

/// Row 14: a CT instance sent on the CR presentation context is refused (0122H, SOP
/// class not supported) without being analysed or filed.
#[test]
fn a_store_of_another_sop_class_than_its_context_is_refused() {
    let door = Door::start(&[]);
    let files = door.instances();
    let (server, port) = (&door.server, door.port);
    assert_store_status(port, &files.join("ct.dcm"), 0x0122);
    // The same path takes a CR.
    assert_store_status(port, &files.join("cr.dcm"), 0x0000);
    assert_metrics(
        server,
        &[
            "cxr_dicom_stores_total{outcome=\"failed\"} 1",
            "cxr_dicom_stores_total{outcome=\"analysed\"} 1",
        ],
    );
}

/// Row 14: an operation the node does not provide (a C-FIND on an accepted context)
/// is answered at once with its response, status 0211H (unrecognized operation);
/// dcmtk's findscu, which proposes a C-FIND context, is refused at negotiation and
/// returns at once.
#[test]
fn an_unsupported_operation_is_refused_at_once() {
    let door = Door::start(&[]);
    let port = door.port;
    let mut a = associate(port);
    let ctx = context(&a, CR);
    let started = Instant::now();
    send_command(&mut a, ctx, 0x0020, CR, "", true).unwrap();
    let mut identifier = InMemDicomObject::new_empty();
    identifier.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from("STUDY"),
    ));
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut bytes = Vec::new();
    identifier.write_dataset_with_ts(&mut bytes, &ts).unwrap();
    a.send(&pdata(ctx, false, true, bytes)).unwrap();
    assert_eq!(response(&mut a), (0x8020, 0x0211));
    // An N-ACTION, no data set.
    send_command(&mut a, ctx, 0x0130, CR, "1.2.3", false).unwrap();
    assert_eq!(response(&mut a), (0x8130, 0x0211));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Still usable.
    let v = context(&a, VERIFICATION);
    send_command(&mut a, v, 0x0030, VERIFICATION, "", false).unwrap();
    assert_eq!(response(&mut a), (0x8030, 0x0000));
    a.release().unwrap();

    let started = Instant::now();
    let out = scu("findscu", port, &["-S", "-k", "QueryRetrieveLevel=STUDY"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(5), "{}", text(&out));
}

/// The core's in-flight slots are the DICOM node's too: with --max-inflight 1 and a
/// request held a second in its batch, of a C-STORE and a /predict sent together one
/// is refused — the C-STORE with A700H (out of resources: the modality retries), or
/// the /predict with 503.
#[test]
fn a_store_takes_one_of_the_cores_inflight_slots() {
    let door = Door::start(&[
        "--max-inflight",
        "1",
        "--max-batch",
        "64",
        "--batch-wait-us",
        "1000000",
    ]);
    let files = door.instances();
    let (server, port) = (&door.server, door.port);
    server.wait_ready();
    let cr = files.join("cr.dcm");
    let store = std::thread::spawn(move || store_on_cr_context(port, &cr));
    std::thread::sleep(Duration::from_millis(300));
    let png = common::png_bytes(&common::gray_image(128, 100, 5));
    let (http, body) = common::tcp_http(&server.addr, "POST", "/predict", Some("image/png"), &png);
    let dicom = store.join().unwrap();
    assert!(
        (http == 503 && dicom == 0x0000) || (http == 200 && dicom == 0xA700),
        "one of them is refused: /predict {http} {body}, C-STORE {dicom:04X}"
    );
    if dicom == 0xA700 {
        assert_metrics(server, &["cxr_dicom_stores_total{outcome=\"busy\"} 1"]);
    }
}

/// The data sets being received count against --max-buffered-bytes, the budget
/// every door shares: with one association holding most of it in a data set still
/// arriving, another's C-STORE is answered A700H (out of resources) without its data
/// set being kept; once the first is gone, the same store is taken. The same with an
/// HTTP /predict body still arriving.
#[test]
fn data_sets_being_received_share_the_buffered_bytes_budget() {
    let mib = (1usize << 20).to_string();
    let door = Door::start(&["--max-body-bytes", &mib, "--max-buffered-bytes", &mib]);
    let files = door.instances();
    let (server, port) = (&door.server, door.port);
    server.wait_ready();
    let mut holder = associate(port);
    let ctx = context(&holder, CR);
    send_command(&mut holder, ctx, 0x0001, CR, "1.2.3.4", true).unwrap();
    send_data(&mut holder, ctx, &vec![0u8; 900 * 1024], false);
    std::thread::sleep(Duration::from_millis(500));
    let cr = files.join("cr.dcm");
    assert_store_status(port, &cr, 0xA700);
    assert_metrics(server, &["cxr_dicom_stores_total{outcome=\"busy\"} 1"]);
    holder.abort().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_store_status(port, &cr, 0x0000);

    // The budget is the HTTP door's too: a /predict body of 1 MiB still arriving
    // holds it all.
    let mut upload = TcpStream::connect(&server.addr).unwrap();
    write!(
        upload,
        "POST /predict HTTP/1.1\r\nHost: cxr\r\nContent-Type: image/png\r\nContent-Length: {mib}\r\n\r\n"
    )
    .unwrap();
    upload.write_all(&[0u8; 1024]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let cr2 = files.join("cr2.dcm");
    assert_store_status(port, &cr2, 0xA700);
    drop(upload);
    std::thread::sleep(Duration::from_millis(300));
    assert_store_status(port, &cr2, 0x0000);
}
