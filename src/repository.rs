//! The model repository: which versions of which variants are loaded, changed live.
//!
//! The models folder is the truth (`models/<name>.json`, or versions side by side in
//! `models/<name>/<version>/`, see [`crate::registry`]); what is served is a
//! [`ModelSet`] built from it and installed whole into the core. Every change (a
//! rescan on `SIGHUP`, the Open Inference Protocol's repository extension) goes the
//! same way:
//!
//! 1. the cards on disk are read; a version not loaded yet, or whose card now names
//!    another file, is verified (card, SHA-256, OOD model), its session created and
//!    warmed at every batch size, and its worker started, all while the serving set
//!    answers;
//! 2. a version that does not check out is refused with its reason (kept for
//!    `POST /v2/repository/index`), and what was serving stays;
//! 3. the new set is installed at once: each variant's default is the version the
//!    repository call pinned, else the one `models/<name>/DEFAULT` names, else the
//!    highest. Requests already validated finish on the version they chose; a
//!    version no set holds any more is unloaded when its last request is done (its
//!    queue closes and its worker answers what was queued, then ends).
//!
//! Changes are serialised (one at a time, on the caller's blocking thread); answers
//! never wait for them. `/ready` stays 200 throughout: the set being replaced serves
//! until the new one is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::inference::{LoadConfig, LoadContext, LoadError, ModelSet, ServedModel};
use crate::metrics::{ServedVersion, ServerMetrics};
use crate::registry::{self, CardEntry};

/// The cell the core answers from, shared with the repository that fills it.
pub type LiveSet = Arc<RwLock<Option<Arc<ModelSet>>>>;

crate::message_error!(
    /// A shadow that cannot be: its spec or share is wrong.
    ShadowError
);

/// A candidate to run in the shadow of a variant's default (`--shadow
/// weighted@2.1.0`).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSpec {
    /// The variant.
    pub name: String,
    /// The candidate version (loaded beside the default).
    pub version: String,
    /// Share of the variant's requests it runs on, in (0, 1].
    pub share: f64,
}

impl ShadowSpec {
    /// Parses `NAME@VERSION` with the share given.
    pub fn parse(spec: &str, share: f64) -> Result<Self, ShadowError> {
        let (name, version) = spec.split_once('@').ok_or_else(|| {
            ShadowError(format!(
                "--shadow `{spec}`: give NAME@VERSION, e.g. weighted@2.1.0"
            ))
        })?;
        if name.is_empty() || version.is_empty() {
            return Err(ShadowError(format!(
                "--shadow `{spec}`: give NAME@VERSION, e.g. weighted@2.1.0"
            )));
        }
        check_share(share)?;
        Ok(Self {
            name: name.into(),
            version: version.into(),
            share,
        })
    }
}

fn check_share(share: f64) -> Result<(), ShadowError> {
    if share > 0.0 && share <= 1.0 {
        Ok(())
    } else {
        Err(ShadowError(format!(
            "shadow share {share} must lie in (0, 1]"
        )))
    }
}

/// Why a repository call changed nothing (or not everything it asked).
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No such variant (or version) on disk.
    #[error("{0}")]
    NotFound(String),
    /// What was asked cannot be done as asked (the set would be left unservable).
    #[error("{0}")]
    Refused(String),
    /// A version did not check out: refused, and what was serving stays.
    #[error("{0}")]
    Invalid(String),
    /// The models folder or the runtime failed.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// A `load` call's parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadParams {
    /// Load only this version (else every version of the variant on disk).
    pub version: Option<String>,
    /// Make `version` the variant's default once it is loaded and warmed (the
    /// swap). Kept across rescans while that version is on disk.
    pub default: Option<bool>,
    /// Run `version` in the shadow of the variant's default (`true`), or stop the
    /// variant's shadow (`false`).
    pub shadow: Option<bool>,
    /// The share of requests the shadow runs on, in (0, 1] (default: `--shadow-share`).
    pub shadow_share: Option<f64>,
}

/// Whether a version answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Loaded: it answers.
    Ready,
    /// On disk but not loaded (unloaded, never loaded, or refused: see the reason).
    Unavailable,
}

/// One version in the repository index.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    /// Variant name.
    pub name: String,
    /// Version (the card's).
    pub version: String,
    /// Whether it answers.
    pub state: Availability,
    /// Why it is not loaded; empty when ready.
    pub reason: String,
    /// Whether it is its variant's default version.
    pub default: bool,
    /// Whether it runs in the shadow of its variant's default.
    pub shadow: bool,
}

/// What a change did (serialised as the audit trail records it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Change {
    /// Versions loaded and warmed (`name@version`).
    pub loaded: Vec<String>,
    /// Versions taken out of the set (unloaded once their requests are done).
    pub unloaded: Vec<String>,
    /// Versions refused, with why (what was serving stays).
    pub refused: Vec<String>,
    /// Each variant's default version after the change.
    pub defaults: BTreeMap<String, String>,
}

#[derive(Default)]
struct State {
    /// name → version → model.
    loaded: BTreeMap<String, BTreeMap<String, Arc<ServedModel>>>,
    /// (name, version or card path) → why it was refused.
    failed: BTreeMap<(String, String), String>,
    /// Variants unloaded by a call: a rescan leaves them out until loaded again.
    unloaded: BTreeSet<String>,
    /// Versions unloaded by a call.
    unloaded_versions: BTreeSet<(String, String)>,
    /// Defaults pinned by a call.
    pins: BTreeMap<String, String>,
    /// Shadows: name → (version, share).
    shadows: BTreeMap<String, (String, f64)>,
    /// Versions a call loaded beside the default (not made the default): the
    /// highest-version rule passes them over until a call, `DEFAULT` or an unload
    /// makes one the default.
    held: BTreeSet<(String, String)>,
    /// Worker threads of every version loaded (joined at shutdown).
    workers: Vec<JoinHandle<()>>,
}

/// The marks a call sets or clears, kept to be put back when the call fails.
struct Marks {
    unloaded: BTreeSet<String>,
    unloaded_versions: BTreeSet<(String, String)>,
    held: BTreeSet<(String, String)>,
}

impl Marks {
    fn of(st: &State) -> Self {
        Self {
            unloaded: st.unloaded.clone(),
            unloaded_versions: st.unloaded_versions.clone(),
            held: st.held.clone(),
        }
    }

    fn restore(self, st: &mut State) {
        st.unloaded = self.unloaded;
        st.unloaded_versions = self.unloaded_versions;
        st.held = self.held;
    }
}

/// The model repository of a server.
pub struct Repository {
    cfg: LoadConfig,
    metrics: Arc<ServerMetrics>,
    live: LiveSet,
    default_share: f64,
    state: Mutex<State>,
}

/// The version and ONNX SHA-256 a card declares ([`registry::peek`]).
type Declared = (String, String);

/// Which versions a sync looks at.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// Every variant not unloaded by a call.
    All,
    /// One variant, every version (or one).
    Name(&'a str, Option<&'a str>),
}

impl Repository {
    /// Loads every version in the models folder (any that does not check out stops
    /// the start, as before there was a repository), installs the set into `live`,
    /// and sets the shadows.
    pub fn start(
        cfg: LoadConfig,
        metrics: Arc<ServerMetrics>,
        live: LiveSet,
        shadows: &[ShadowSpec],
        default_share: f64,
    ) -> Result<Arc<Self>, LoadError> {
        let (set, workers) = crate::inference::load_models(&cfg, |n| metrics.observer(n))?;
        let mut state = State {
            workers,
            ..State::default()
        };
        for m in set.every_version() {
            state
                .loaded
                .entry(m.card.name.clone())
                .or_default()
                .insert(m.card.version.clone(), m.clone());
        }
        for s in shadows {
            if set.get_version(&s.name, &s.version).is_none() {
                return Err(LoadError::Registry(registry::RegistryError::Invalid {
                    path: cfg.models_dir.join(&s.name),
                    reason: format!(
                        "--shadow {}@{}: that version is not in the models folder (put it in {}/{}/{}/)",
                        s.name,
                        s.version,
                        cfg.models_dir.display(),
                        s.name,
                        s.version
                    ),
                }));
            }
            state
                .shadows
                .insert(s.name.clone(), (s.version.clone(), s.share));
        }
        let repo = Arc::new(Self {
            cfg,
            metrics,
            live,
            default_share,
            state: Mutex::new(state),
        });
        {
            let mut st = repo.lock();
            repo.publish(&mut st)?;
        }
        Ok(repo)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the models folder again (`SIGHUP`): new versions are loaded, changed
    /// ones reloaded, removed ones unloaded (never a variant's last), and defaults
    /// chosen again; variants unloaded by a call stay unloaded.
    pub fn rescan(&self) -> Result<Change, RepoError> {
        let mut st = self.lock();
        let r = self.sync(&mut st, Scope::All);
        self.count("rescan", &r);
        r
    }

    /// The repository extension's `load`: the variant's versions on disk (or
    /// `params.version`) are loaded and warmed, then installed; with `default`, that
    /// version becomes the default; with `shadow`, it runs in the default's shadow.
    pub fn load(&self, name: &str, params: &LoadParams) -> Result<Change, RepoError> {
        let mut st = self.lock();
        let r = self.load_locked(&mut st, name, params);
        self.count("load", &r);
        r
    }

    fn load_locked(&self, st: &mut State, name: &str, p: &LoadParams) -> Result<Change, RepoError> {
        if let Some(share) = p.shadow_share {
            check_share(share).map_err(|e| RepoError::Refused(e.to_string()))?;
        }
        if (p.default == Some(true) || p.shadow == Some(true)) && p.version.is_none() {
            return Err(RepoError::Refused(
                "`default` and `shadow` need `version`: which version?".into(),
            ));
        }
        if p.default == Some(true) && p.shadow == Some(true) {
            return Err(RepoError::Refused(
                "a version is either the default or in its shadow, not both".into(),
            ));
        }
        let version = p.version.as_deref();
        // A call that fails changes nothing: every mark it touches is put back.
        let before = Marks::of(st);
        st.unloaded.remove(name);
        match version {
            Some(v) => {
                st.unloaded_versions
                    .remove(&(name.to_string(), v.to_string()));
            }
            None => st.unloaded_versions.retain(|(n, _)| n != name),
        }
        let (old_pin, old_shadow) = (st.pins.get(name).cloned(), st.shadows.get(name).cloned());
        if let Some(v) = version {
            // Loaded beside the default unless made the default: never swapped in
            // by being the highest.
            let key = (name.to_string(), v.to_string());
            if p.default == Some(true) {
                st.held.remove(&key);
            } else if st.pins.get(name).is_none_or(|pin| pin != v) && !self.is_default_now(name, v)
            {
                st.held.insert(key);
            }
            if p.default == Some(true) {
                st.pins.insert(name.into(), v.into());
                // A candidate made the default no longer shadows itself.
                if st.shadows.get(name).is_some_and(|(s, _)| s == v) {
                    st.shadows.remove(name);
                }
            }
            if p.shadow == Some(true) {
                let share = p.shadow_share.unwrap_or(self.default_share);
                st.shadows.insert(name.into(), (v.into(), share));
            }
        }
        if p.shadow == Some(false) {
            st.shadows.remove(name);
        }
        let r = self.sync(st, Scope::Name(name, version));
        let restore = |st: &mut State| {
            before.restore(st);
            match old_pin {
                Some(v) => st.pins.insert(name.into(), v),
                None => st.pins.remove(name),
            };
            match old_shadow {
                Some(s) => st.shadows.insert(name.into(), s),
                None => st.shadows.remove(name),
            };
        };
        match r {
            Ok(change) => {
                let loaded = version.is_none_or(|v| self.is_loaded(st, name, v));
                if loaded {
                    Ok(change)
                } else {
                    // The version asked for was refused: the pin or shadow it asked
                    // for is withdrawn (what was serving stays).
                    restore(st);
                    self.publish(st)?;
                    Err(RepoError::Invalid(format!(
                        "model `{name}` version `{}` was not loaded: {}",
                        version.unwrap_or_default(),
                        change.refused.join("; ")
                    )))
                }
            }
            Err(e) => {
                restore(st);
                let _ = self.publish(st);
                Err(e)
            }
        }
    }

    /// The door model (`--dicom-model`) that unloading `name` (or its `version`)
    /// would take away, if any: a door set to `NAME` needs the variant, one set to
    /// `NAME@VERSION` that version.
    fn door_model(&self, name: &str, version: Option<&str>) -> Option<&str> {
        self.cfg
            .door_models
            .iter()
            .find(|spec| match spec.split_once('@') {
                Some((n, v)) => n == name && version.is_none_or(|asked| asked == v),
                None => spec.as_str() == name && version.is_none(),
            })
            .map(String::as_str)
    }

    /// Whether `name@version` is its variant's default in the set serving now.
    fn is_default_now(&self, name: &str, version: &str) -> bool {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner()).clone();
        live.is_some_and(|set| set.get(name).is_some_and(|m| m.card.version == version))
    }

    fn is_loaded(&self, st: &State, name: &str, version: &str) -> bool {
        st.loaded.get(name).is_some_and(|v| v.contains_key(version))
    }

    /// The repository extension's `unload`: the variant (every version), or one
    /// version, leaves the set; it stays out of rescans until loaded again. The last
    /// variant, the `--default-model`, and a variant's only version cannot go.
    pub fn unload(&self, name: &str, version: Option<&str>) -> Result<Change, RepoError> {
        let mut st = self.lock();
        let r = self.unload_locked(&mut st, name, version);
        self.count("unload", &r);
        r
    }

    fn unload_locked(
        &self,
        st: &mut State,
        name: &str,
        version: Option<&str>,
    ) -> Result<Change, RepoError> {
        let Some(versions) = st.loaded.get(name) else {
            return Err(RepoError::NotFound(format!("model `{name}` is not loaded")));
        };
        let mut change = Change::default();
        match version {
            Some(v) => {
                if !versions.contains_key(v) {
                    return Err(RepoError::NotFound(format!(
                        "model `{name}` has no version `{v}` loaded"
                    )));
                }
                if versions.len() == 1 {
                    return Err(RepoError::Refused(format!(
                        "`{name}@{v}` is the only version of `{name}` loaded: load another first, or unload the model"
                    )));
                }
                if let Some(door) = self.door_model(name, Some(v)) {
                    return Err(RepoError::Refused(format!(
                        "`{name}@{v}` answers the DICOM node (--dicom-model {door}): every C-STORE would be refused"
                    )));
                }
                st.unloaded_versions.insert((name.into(), v.into()));
                st.held.remove(&(name.to_string(), v.to_string()));
                if st.pins.get(name).is_some_and(|p| p == v) {
                    st.pins.remove(name);
                }
                if st.shadows.get(name).is_some_and(|(s, _)| s == v) {
                    st.shadows.remove(name);
                }
                if let Some(vs) = st.loaded.get_mut(name) {
                    vs.remove(v);
                }
                change.unloaded.push(format!("{name}@{v}"));
            }
            None => {
                if st.loaded.len() == 1 {
                    return Err(RepoError::Refused(format!(
                        "`{name}` is the last model loaded: the server would have none to answer with"
                    )));
                }
                if self.cfg.default_model.as_deref() == Some(name) {
                    return Err(RepoError::Refused(format!(
                        "`{name}` is the server's --default-model"
                    )));
                }
                if let Some(door) = self.door_model(name, None) {
                    return Err(RepoError::Refused(format!(
                        "`{name}` answers the DICOM node (--dicom-model {door}): every C-STORE would be refused"
                    )));
                }
                st.unloaded.insert(name.into());
                st.shadows.remove(name);
                let gone = st.loaded.remove(name).unwrap_or_default();
                change
                    .unloaded
                    .extend(gone.keys().map(|v| format!("{name}@{v}")));
            }
        }
        change.defaults = self.publish(st)?;
        tracing::info!(unloaded = ?change.unloaded, "models unloaded");
        Ok(change)
    }

    /// Every version on disk or loaded, with its state (`POST /v2/repository/index`).
    pub fn index(&self) -> Vec<IndexEntry> {
        let st = self.lock();
        let live = self.live.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out: BTreeMap<(String, String), IndexEntry> = BTreeMap::new();
        let entry = |name: &str, version: &str, state: Availability, reason: String| IndexEntry {
            name: name.into(),
            version: version.into(),
            state,
            reason,
            default: false,
            shadow: false,
        };
        for e in registry::scan(&self.cfg.models_dir).unwrap_or_default() {
            let Some((version, _)) = registry::peek(&e.path) else {
                continue;
            };
            let reason = if st.unloaded.contains(&e.name)
                || st
                    .unloaded_versions
                    .contains(&(e.name.clone(), version.clone()))
            {
                "unloaded".to_string()
            } else {
                "not loaded: send a load request or SIGHUP".to_string()
            };
            out.insert(
                (e.name.clone(), version.clone()),
                entry(&e.name, &version, Availability::Unavailable, reason),
            );
        }
        for ((name, version), why) in &st.failed {
            out.insert(
                (name.clone(), version.clone()),
                entry(name, version, Availability::Unavailable, why.clone()),
            );
        }
        for (name, versions) in &st.loaded {
            for (version, m) in versions {
                let mut e = entry(name, version, Availability::Ready, String::new());
                if let Some(set) = &live {
                    e.default = set.is_default(m);
                    e.shadow = set.is_shadow(m);
                }
                out.insert((name.clone(), version.clone()), e);
            }
        }
        out.into_values().collect()
    }

    /// Takes every version out (shutdown): the set is dropped, and the worker
    /// threads are returned to be joined once the last requests are done.
    pub fn close(&self) -> Vec<JoinHandle<()>> {
        let mut st = self.lock();
        st.loaded.clear();
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = None;
        std::mem::take(&mut st.workers)
    }

    fn count(&self, op: &str, r: &Result<Change, RepoError>) {
        let outcome = match r {
            Ok(c) if c.refused.is_empty() => "ok",
            Ok(_) => "partly_refused",
            Err(RepoError::Invalid(_)) => "refused_invalid",
            Err(_) => "refused",
        };
        self.metrics
            .repository_operations
            .with_label_values(&[op, outcome])
            .inc();
    }

    /// Brings the loaded versions in `scope` in line with the disk, then installs
    /// the set.
    fn sync(&self, st: &mut State, scope: Scope<'_>) -> Result<Change, RepoError> {
        let entries = registry::scan(&self.cfg.models_dir).map_err(LoadError::from)?;
        // Each card on disk with the version and file hash it declares (read once;
        // none when it is not a card).
        let mut by_name: BTreeMap<String, Vec<(CardEntry, Option<Declared>)>> = BTreeMap::new();
        for e in entries {
            let declared = registry::peek(&e.path);
            by_name
                .entry(e.name.clone())
                .or_default()
                .push((e, declared));
        }
        let names: Vec<String> = match scope {
            Scope::All => by_name
                .keys()
                .chain(st.loaded.keys())
                .filter(|n| !st.unloaded.contains(*n))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            Scope::Name(n, v) => {
                if !by_name.contains_key(n) && !st.loaded.contains_key(n) {
                    return Err(RepoError::NotFound(format!(
                        "no model `{n}` in {}",
                        self.cfg.models_dir.display()
                    )));
                }
                if let Some(v) = v
                    && !by_name.get(n).is_some_and(|es| {
                        es.iter().any(|(e, declared)| {
                            declared.as_ref().is_some_and(|(ver, _)| ver == v)
                                || e.folder_version.as_deref() == Some(v)
                        })
                    })
                {
                    return Err(RepoError::NotFound(format!(
                        "no version `{v}` of model `{n}` in {}",
                        self.cfg.models_dir.display()
                    )));
                }
                vec![n.to_string()]
            }
        };
        let only = match scope {
            Scope::Name(_, v) => v,
            Scope::All => None,
        };
        let ctx = LoadContext::new(&self.cfg)?;
        let mut change = Change::default();
        for name in &names {
            let disk = by_name.get(name).map(Vec::as_slice).unwrap_or_default();
            let mut on_disk = BTreeSet::new();
            for (e, declared) in disk {
                let key_of_path = (name.clone(), e.path.display().to_string());
                let Some((version, sha)) = declared.clone() else {
                    // Not even a card: its full load says why.
                    let why = registry::load_entry(e)
                        .err()
                        .map_or_else(|| "not a valid model card".into(), |e| e.to_string());
                    if only.is_none() {
                        change.refused.push(why.clone());
                        st.failed.insert(key_of_path, why);
                    }
                    continue;
                };
                st.failed.remove(&key_of_path);
                if only.is_some_and(|v| v != version) {
                    on_disk.insert(version);
                    continue;
                }
                if only.is_none()
                    && st
                        .unloaded_versions
                        .contains(&(name.clone(), version.clone()))
                {
                    on_disk.insert(version);
                    continue;
                }
                if !on_disk.insert(version.clone()) {
                    let why = format!(
                        "{}: model `{name}` version `{version}` is on disk twice",
                        e.path.display()
                    );
                    change.refused.push(why.clone());
                    st.failed.insert((name.clone(), version), why);
                    continue;
                }
                let current = st.loaded.get(name).and_then(|v| v.get(&version));
                if current.is_some_and(|m| m.card.onnx.sha256.eq_ignore_ascii_case(&sha)) {
                    continue;
                }
                let obs = self.metrics.observer(name);
                match registry::load_entry(e)
                    .map_err(LoadError::from)
                    .and_then(|m| ctx.load(m, obs))
                {
                    Ok((m, worker)) => {
                        st.workers.push(worker);
                        st.failed.remove(&(name.clone(), version.clone()));
                        change.loaded.push(format!("{name}@{version}"));
                        st.loaded
                            .entry(name.clone())
                            .or_default()
                            .insert(version, m);
                    }
                    Err(err) => {
                        let why = err.to_string();
                        tracing::warn!(model = %name, version = %version, reason = %why, "version refused; what was serving stays");
                        change.refused.push(why.clone());
                        st.failed.insert((name.clone(), version), why);
                    }
                }
            }
            // Versions gone from disk are unloaded, never the variant's last.
            if only.is_none()
                && let Some(loaded) = st.loaded.get_mut(name)
            {
                let gone: Vec<String> = loaded
                    .keys()
                    .filter(|v| {
                        !on_disk.contains(*v)
                            || st.unloaded_versions.contains(&(name.clone(), (*v).clone()))
                    })
                    .cloned()
                    .collect();
                for v in gone {
                    if loaded.len() == 1 {
                        tracing::warn!(model = %name, version = %v, "its files are gone from the models folder, but it is the variant's only version: it stays loaded");
                        break;
                    }
                    loaded.remove(&v);
                    change.unloaded.push(format!("{name}@{v}"));
                }
            }
        }
        st.loaded.retain(|_, v| !v.is_empty());
        st.workers.retain(|w| !w.is_finished());
        change.defaults = self.publish(st)?;
        tracing::info!(loaded = ?change.loaded, unloaded = ?change.unloaded, refused = ?change.refused, defaults = ?change.defaults, "model repository synced");
        Ok(change)
    }

    /// Builds the set from the loaded versions and installs it; returns each
    /// variant's default version.
    fn publish(&self, st: &mut State) -> Result<BTreeMap<String, String>, LoadError> {
        let mut defaults = BTreeMap::new();
        for (name, versions) in &st.loaded {
            let pinned = st.pins.get(name).filter(|v| versions.contains_key(*v));
            let from_file = registry::default_version(&self.cfg.models_dir, name)
                .filter(|v| versions.contains_key(v));
            if let Some(v) = pinned.cloned().or(from_file) {
                defaults.insert(name.clone(), v);
            }
        }
        let versions: BTreeMap<String, Vec<Arc<ServedModel>>> = st
            .loaded
            .iter()
            .map(|(n, vs)| (n.clone(), vs.values().cloned().collect()))
            .collect();
        st.held
            .retain(|(n, v)| st.loaded.get(n).is_some_and(|vs| vs.contains_key(v)));
        let set = ModelSet::build(versions, &defaults, &self.cfg, &st.shadows, &st.held)?;
        let chosen: BTreeMap<String, String> = set
            .all()
            .iter()
            .map(|m| (m.card.name.clone(), m.card.version.clone()))
            .collect();
        self.metrics
            .set_model_versions(set.every_version().map(|m| {
                ServedVersion {
                    name: &m.card.name,
                    version: &m.card.version,
                    role: set.role(m),
                    backend: m.provider.as_str(),
                    decision: m
                        .backend_decision
                        .as_ref()
                        .map_or("asked", |d| d.source.as_str()),
                }
            }));
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(set));
        Ok(chosen)
    }
}
