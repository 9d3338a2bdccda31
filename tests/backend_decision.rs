//! The deployment's backend decision (`--backend auto --backend-decision FILE`),
//! through the real binary on writer-made tiny models: replicas sharing the file take
//! one decision and answer alike to the bit; a changed model file or CPU measures
//! anew; a corrupt or foreign file, or an entry its own figures contradict, is
//! ignored with a warning and never trusted.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A replica: `--backend auto` with its decision and OpenVINO's cache in `state`.
fn replica(models: &Path, state: &Path) -> common::Server {
    replica_cached(models, state, &state.join("ov-cache"))
}

/// [`replica`] with OpenVINO's compiled-model cache in `cache`.
fn replica_cached(models: &Path, state: &Path, cache: &Path) -> common::Server {
    replica_env(models, state, cache, &[])
}

/// [`replica_cached`] with `env` set for the process (e.g. `OPENVINO_LIB`).
fn replica_env(models: &Path, state: &Path, cache: &Path, env: &[(&str, &Path)]) -> common::Server {
    let file = decision_file(state);
    let mut s = common::Server::start_env(models, &auto_args(&file, cache), "addr", env);
    s.discard_logs();
    s
}

/// `--backend auto` with its decision in `file` and OpenVINO's cache in `cache`.
fn auto_args<'a>(file: &'a Path, cache: &'a Path) -> [&'a OsStr; 6] {
    [
        "--backend".as_ref(),
        "auto".as_ref(),
        "--backend-decision".as_ref(),
        file.as_os_str(),
        "--openvino-cache-dir".as_ref(),
        cache.as_os_str(),
    ]
}

/// The models, and a state folder where a first replica (gone) wrote its decision:
/// the decision it wrote.
fn first_decision() -> (tempfile::TempDir, tempfile::TempDir, Value) {
    let models = common::models_dir();
    let state = tempfile::tempdir().unwrap();
    drop(replica(models.path(), state.path()));
    let file = read_file(state.path());
    (models, state, file)
}

fn decision_file(state: &Path) -> PathBuf {
    state.join("decision.json")
}

/// `live` of `/models/{name}`.
fn live(server: &common::Server, name: &str) -> Value {
    let (status, body) =
        common::tcp_http(&server.addr, "GET", &format!("/models/{name}"), None, b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["live"].clone()
}

/// The probabilities `model` answers for `png`, as JSON (shortest round-trip floats:
/// equal values are equal bits).
fn probabilities(server: &common::Server, model: &str, png: &[u8]) -> Value {
    let (status, body) = common::tcp_http(
        &server.addr,
        "POST",
        &format!("/predict?model={model}"),
        Some("image/png"),
        png,
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["probabilities"].clone()
}

fn read_file(state: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(decision_file(state)).unwrap()).unwrap()
}

fn write_file(state: &Path, v: &Value) {
    std::fs::write(decision_file(state), serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// The latest entry of `model` in the file.
fn entry_of<'a>(file: &'a mut Value, model: &str) -> &'a mut Value {
    file["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .rev()
        .find(|e| e["model"] == model)
        .unwrap_or_else(|| panic!("no entry for {model}"))
}

/// Makes `model`'s entry name `backend` (ONNX Runtime the incumbent), with figures
/// that choose it (twice as fast).
fn name_backend(file: &mut Value, model: &str, backend: &str) {
    let (ort, ov) = if backend == "openvino" {
        (10.0, 5.0)
    } else {
        (5.0, 10.0)
    };
    let e = entry_of(file, model);
    e["backend"] = backend.into();
    e["incumbent"] = "ort".into();
    for k in ["ort_batch1_ms", "ort_per_image_ms"] {
        e["figures"][k] = ort.into();
    }
    for k in ["openvino_batch1_ms", "openvino_per_image_ms"] {
        e["figures"][k] = ov.into();
    }
}

/// The warnings in a replica's start-up log: (message, reason).
fn warnings(server: &common::Server) -> Vec<(String, String)> {
    server
        .startup
        .iter()
        .filter(|v| v["level"] == "WARN")
        .map(|v| {
            (
                v["fields"]["message"].as_str().unwrap_or("").to_string(),
                v["fields"]["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The reasons of the start-up warnings whose message starts with `message`.
fn warned(server: &common::Server, message: &str) -> Vec<String> {
    warnings(server)
        .into_iter()
        .filter(|(m, _)| m.starts_with(message))
        .map(|(_, reason)| reason)
        .collect()
}

/// Asserts that `a` and `b` answer each of [`films`] alike to the bit with `model`.
fn assert_answer_alike(a: &common::Server, b: &common::Server, model: &str) {
    for png in films() {
        assert_eq!(
            probabilities(a, model, &png),
            probabilities(b, model, &png),
            "{model}"
        );
    }
}

fn films() -> Vec<Vec<u8>> {
    (0..3)
        .map(|i| common::png_bytes(&common::gray_image(80 + 8 * i, 72, 3 + i)))
        .collect()
}

fn source(l: &Value) -> &str {
    l["backend_decision"]["source"].as_str().unwrap_or("none")
}

#[test]
fn replicas_sharing_a_decision_take_it_and_answer_alike() {
    let models = common::models_dir();
    let state = tempfile::tempdir().unwrap();
    let file = decision_file(state.path());
    let a = replica(models.path(), state.path());
    for m in ["alpha", "beta"] {
        let l = live(&a, m);
        assert_eq!(source(&l), "measured", "{l}");
        assert_eq!(l["backend_decision"]["written"], true, "{l}");
        assert_eq!(l["backend_decision"]["file"], file.display().to_string());
        assert!(
            l["backend_choice"]
                .as_str()
                .unwrap()
                .starts_with("measured")
        );
    }
    // The file: one entry per model, keyed by its file's hash, this CPU and the
    // runtimes.
    let written = read_file(state.path());
    assert_eq!(written["format"], "cxr-backend-decision/1");
    assert_eq!(written["entries"].as_array().unwrap().len(), 2, "{written}");
    let card = cxr::registry::load_card(&models.path().join("alpha.json")).unwrap();
    let mut w = written.clone();
    let alpha = entry_of(&mut w, "alpha").clone();
    assert_eq!(alpha["key"]["file_sha256"], card.card.onnx.sha256);
    let flags = cxr::inference::decision::CpuFacts::this_machine().flags;
    assert_eq!(
        alpha["key"]["cpu"]["flags"].as_array().unwrap().len(),
        flags.len()
    );
    assert!(alpha["key"]["runtimes"]["openvino"].as_str().unwrap() != "");
    // OpenVINO's compiled models are in the cache.
    let cached = std::fs::read_dir(state.path().join("ov-cache"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "blob")
        })
        .count();
    assert!(cached >= 2, "{cached} compiled models in the cache");

    // A second replica beside the first: the decision read, not measured.
    let b = replica(models.path(), state.path());
    for m in ["alpha", "beta"] {
        let (la, lb) = (live(&a, m), live(&b, m));
        assert_eq!(source(&lb), "read", "{lb}");
        assert_eq!(lb["backend_decision"]["written"], false);
        // Taken from the file, not measured (and then found there).
        let why = lb["backend_choice"].as_str().unwrap();
        assert!(why.starts_with("read from"), "{why}");
        assert_eq!(
            lb["backend_decision"]["decided_at"],
            la["backend_decision"]["decided_at"]
        );
        assert_eq!(la["execution_provider"], lb["execution_provider"]);
        assert_answer_alike(&a, &b, m);
    }
    // And in metrics: where each version's backend came from.
    for (r, how) in [(&a, "measured"), (&b, "read")] {
        let (status, text) = common::tcp_http(&r.addr, "GET", "/metrics", None, b"");
        assert_eq!(status, 200);
        let line = text
            .lines()
            .find(|l| l.starts_with("cxr_model_backend{") && l.contains("model=\"alpha\""))
            .unwrap_or_else(|| panic!("no cxr_model_backend for alpha"));
        assert!(
            line.contains(&format!("decision=\"{how}\"")) && line.ends_with(" 1"),
            "{line}"
        );
    }
    drop((a, b));
    assert_eq!(read_file(state.path()), written, "reading writes nothing");

    // Taken as is: a decision naming OpenVINO for alpha and ONNX Runtime for beta
    // (its figures say so) serves both replicas so, whatever they would measure;
    // one compiles OpenVINO's model afresh (an empty cache), the other loads it
    // from the cache, and they answer alike to the bit.
    let mut f = written.clone();
    name_backend(&mut f, "alpha", "openvino");
    name_backend(&mut f, "beta", "ort");
    write_file(state.path(), &f);
    let (c, d) = (
        replica_cached(
            models.path(),
            state.path(),
            &state.path().join("empty-cache"),
        ),
        replica(models.path(), state.path()),
    );
    for (m, provider) in [("alpha", "OpenVINO:CPU"), ("beta", "CPUExecutionProvider")] {
        for r in [&c, &d] {
            let l = live(r, m);
            assert_eq!(source(&l), "read", "{l}");
            assert_eq!(l["execution_provider"], provider, "{l}");
        }
        // Compiled where the cache was empty, loaded where it was filled; nothing
        // to say for ONNX Runtime.
        let cached = |r: &common::Server| live(r, m)["openvino_from_cache"].clone();
        let want = |b: bool| {
            if m == "alpha" {
                Value::Bool(b)
            } else {
                Value::Null
            }
        };
        assert_eq!((cached(&c), cached(&d)), (want(false), want(true)), "{m}");
        assert_answer_alike(&c, &d, m);
    }
}

#[test]
fn a_changed_model_file_or_cpu_measures_anew() {
    let (models, state, mut f) = first_decision();

    // The stored alpha entry was made on a CPU with other flags.
    let e = entry_of(&mut f, "alpha");
    let flags = e["key"]["cpu"]["flags"].as_array_mut().unwrap();
    flags.retain(|x| x != "avx2");
    flags.push("cxr_other_cpu".into());
    write_file(state.path(), &f);
    let b = replica(models.path(), state.path());
    assert_eq!(source(&live(&b, "alpha")), "measured");
    assert_eq!(live(&b, "alpha")["backend_decision"]["written"], true);
    assert_eq!(source(&live(&b, "beta")), "read");
    drop(b);
    // The other CPU's entry is kept beside this CPU's new one.
    let f = read_file(state.path());
    assert_eq!(f["entries"].as_array().unwrap().len(), 3, "{f}");

    // A new alpha file (other weights, other hash).
    common::write_tiny_model(models.path(), "alpha", 11, 0.99, 0.70);
    let sha = cxr::registry::load_card(&models.path().join("alpha.json"))
        .unwrap()
        .card
        .onnx
        .sha256;
    let c = replica(models.path(), state.path());
    assert_eq!(source(&live(&c, "alpha")), "measured");
    assert_eq!(source(&live(&c, "beta")), "read");
    drop(c);
    let mut f = read_file(state.path());
    assert_eq!(f["entries"].as_array().unwrap().len(), 4, "{f}");
    assert_eq!(entry_of(&mut f, "alpha")["key"]["file_sha256"], sha);
}

#[test]
fn a_corrupt_or_foreign_decision_file_is_ignored_with_a_warning() {
    // A valid file to spoil.
    let (models, _, good) = first_decision();
    let mut foreign = good.clone();
    foreign["format"] = "cxr-backend-decision/2".into();
    let truncated = serde_json::to_vec(&good).unwrap()[..200].to_vec();
    for (what, bytes) in [
        ("corrupt", truncated),
        ("foreign", serde_json::to_vec(&foreign).unwrap()),
    ] {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(decision_file(state.path()), &bytes).unwrap();
        let s = replica(models.path(), state.path());
        assert!(
            !warned(&s, "backend decision file ignored").is_empty(),
            "{what}: {:?}",
            warnings(&s)
        );
        for m in ["alpha", "beta"] {
            assert_eq!(source(&live(&s, m)), "measured", "{what}");
        }
        drop(s);
        // Replaced by a file of ours; the old one kept aside.
        let f = read_file(state.path());
        assert_eq!(f["format"], "cxr-backend-decision/1");
        assert_eq!(f["entries"].as_array().unwrap().len(), 2, "{what}");
        let aside = state.path().join("decision.json.rejected");
        assert_eq!(std::fs::read(aside).unwrap(), bytes, "{what}");
    }

    // An entry whose figures do not choose the backend it names.
    let state = tempfile::tempdir().unwrap();
    let mut f = good.clone();
    let e = entry_of(&mut f, "alpha");
    let flipped = if e["backend"] == "ort" {
        "openvino"
    } else {
        "ort"
    };
    e["backend"] = flipped.into();
    write_file(state.path(), &f);
    let s = replica(models.path(), state.path());
    let said = warnings(&s);
    assert!(
        said.iter()
            .any(|(m, r)| m == "backend decision entry ignored"
                && r.contains("alpha")
                && r.contains(&format!("not the {flipped}"))),
        "{said:?}"
    );
    assert_eq!(source(&live(&s, "alpha")), "measured");
    assert_eq!(source(&live(&s, "beta")), "read");
    drop(s);

    // A decision naming OpenVINO whose recorded ONNX Runtime answers are not what
    // OpenVINO answers: warned, and OpenVINO is checked against ONNX Runtime itself.
    let state = tempfile::tempdir().unwrap();
    let mut f = good.clone();
    name_backend(&mut f, "alpha", "openvino");
    let e = entry_of(&mut f, "alpha");
    let wrong: Vec<Value> = e["ort_probe"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (1.0 - p.as_f64().unwrap()).into())
        .collect();
    e["ort_probe"] = wrong.into();
    write_file(state.path(), &f);
    let s = replica(models.path(), state.path());
    assert!(
        !warned(&s, "OpenVINO disagrees with the probe answers").is_empty(),
        "{:?}",
        warnings(&s)
    );
    let l = live(&s, "alpha");
    assert_eq!(source(&l), "read", "{l}");
    assert_eq!(l["execution_provider"], "OpenVINO:CPU", "{l}");
}

/// Without the flags, the decision and the cache live beside the models, and the
/// next start reads them (the file is not taken for a model card).
#[test]
fn by_default_the_decision_lives_beside_the_models() {
    let models = common::models_dir();
    let start = || {
        let mut s = common::Server::start(models.path(), &["--backend", "auto"]);
        s.discard_logs();
        s
    };
    let a = start();
    let l = live(&a, "alpha");
    assert_eq!(source(&l), "measured", "{l}");
    let file = models.path().join("backend.decision.json");
    assert_eq!(l["backend_decision"]["file"], file.display().to_string());
    assert!(models.path().join("openvino-cache").is_dir());
    drop(a);
    let b = start();
    assert_eq!(source(&live(&b, "alpha")), "read");
    assert_eq!(source(&live(&b, "beta")), "read");
}

/// A decision that cannot be written (here its folder is a file): the replica serves
/// by its own measurement, says so once, and the next start measures again.
#[test]
fn an_unwritable_decision_is_measured_at_each_start_and_said_so() {
    let models = common::models_dir();
    let state = tempfile::tempdir().unwrap();
    let blocked = state.path().join("not-a-folder");
    std::fs::write(&blocked, b"").unwrap();
    let file = blocked.join("decision.json");
    let cache = state.path().join("ov-cache");
    for _ in 0..2 {
        let mut s = common::Server::start(models.path(), &auto_args(&file, &cache));
        s.discard_logs();
        let not_kept = warned(&s, "the backend decision is not kept");
        assert_eq!(not_kept.len(), 1, "one warning for the two models");
        for m in ["alpha", "beta"] {
            let l = live(&s, m);
            assert_eq!(source(&l), "measured", "{l}");
            assert_eq!(l["backend_decision"]["written"], false, "{l}");
        }
    }
}

/// Two replicas started at once on no decision: both measure, the first to write
/// wins, and the other serves by its entry: one entry per model, one backend, the
/// same answers.
#[test]
fn replicas_racing_at_first_start_end_with_one_decision() {
    let models = common::models_dir();
    let state = tempfile::tempdir().unwrap();
    let (a, b) = std::thread::scope(|s| {
        let start = || s.spawn(|| replica(models.path(), state.path()));
        let (a, b) = (start(), start());
        (a.join().unwrap(), b.join().unwrap())
    });
    let f = read_file(state.path());
    assert_eq!(f["entries"].as_array().unwrap().len(), 2, "{f}");
    for m in ["alpha", "beta"] {
        let (la, lb) = (live(&a, m), live(&b, m));
        let d = |l: &Value| l["backend_decision"]["decided_at"].clone();
        assert_eq!(d(&la), d(&lb), "{la} {lb}");
        assert_eq!(la["execution_provider"], lb["execution_provider"]);
        assert!(
            la["backend_decision"]["written"] != lb["backend_decision"]["written"]
                || source(&la) == "read"
                || source(&lb) == "read",
            "one of them wrote, the other took it: {la} {lb}"
        );
        assert_answer_alike(&a, &b, m);
    }
}

/// A replica that reads a decision naming OpenVINO but cannot read OpenVINO's cache
/// (here the CPU image's libraries without the IR front end, as the image shipped
/// them before issue 45's fix: every start compiled again) serves, and says so with
/// the cause; with the image's libraries as they are, it loads the compiled model
/// from the cache another replica filled, and says nothing.
#[test]
fn a_cache_that_is_not_read_is_said_with_its_cause() {
    let (models, state, mut f) = first_decision();
    name_backend(&mut f, "alpha", "openvino");
    write_file(state.path(), &f);
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let lib = common::image_openvino_libs(&work.path().join("lib"));
    let cache = state.path().join("ov-cache");
    let start = || {
        replica_env(
            models.path(),
            state.path(),
            &cache,
            &[("OPENVINO_LIB", &lib)],
        )
    };
    let compiled_again = |s: &common::Server| warned(s, "OpenVINO compiled the model again");

    let good = start();
    let l = live(&good, "alpha");
    assert_eq!(
        (source(&l), &l["execution_provider"]),
        ("read", &"OpenVINO:CPU".into()),
        "{l}"
    );
    assert_eq!(l["openvino_from_cache"], true, "{l}");
    assert_eq!(compiled_again(&good), Vec::<String>::new());
    drop(good);

    for e in std::fs::read_dir(lib.parent().unwrap())
        .unwrap()
        .map(Result::unwrap)
    {
        if e.file_name()
            .to_string_lossy()
            .starts_with("libopenvino_ir_frontend")
        {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let broken = start();
    let l = live(&broken, "alpha");
    assert_eq!(l["execution_provider"], "OpenVINO:CPU", "{l}");
    assert_eq!(l["openvino_from_cache"], false, "{l}");
    let reasons = compiled_again(&broken);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("libopenvino_ir_frontend"),
        "{reasons:?}"
    );
}
