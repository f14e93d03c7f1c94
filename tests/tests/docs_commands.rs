//! Every command the README and `docs/` show is exercised here, so the docs cannot drift from the
//! code: commands are taken from `sh` code blocks and from inline code, and each is checked by what
//! it would do.
//!
//! - `pretrain validate|crd|render` with real files run for real and must succeed; every other
//!   `pretrain` and `pretrain-worker` command must name a real subcommand or stage, and every flag it
//!   uses must be one that command's `--help` lists.
//! - `kubectl`: the resource names must be the CRDs' plural, singular or short names, `explain` and
//!   `-o jsonpath` paths must exist in the CRD schema, `apply -f` files that exist must validate.
//! - `helm install`: the chart is rendered (as `operator/tests/support/chart.rs` renders it) with the
//!   command's `--set`/`--set-json` values, checked against `values.schema.json`, and every object
//!   validated against the Kubernetes schemas.
//! - `cargo test|bench|build`: the package, test or bench target, test-name filter and features exist.
//! - `scripts/...`: the script exists and is executable.
//!
//! A command of any other program in a `sh` block fails the test, so a new kind of command needs a
//! check here first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use pretrain_tests::{bin, repo};
use serde_json::{Value, json};

#[path = "../../operator/tests/support/chart.rs"]
mod chart;

/// One command and where it is written.
#[derive(Debug)]
struct DocCommand {
    place: String,
    words: Vec<String>,
}

/// Splits a command line into words, honouring single and double quotes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, c) if c.is_whitespace() => {
                if started || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            (None, c) => word.push(c),
        }
    }
    if started || !word.is_empty() {
        words.push(word);
    }
    words
}

const PROGRAMS: [&str; 6] = ["pretrain", "pretrain-worker", "kubectl", "helm", "cargo", "./target/release/pretrain"];

fn is_command(words: &[String]) -> bool {
    let Some(first) = words.first() else { return false };
    (PROGRAMS.contains(&first.as_str()) || first.starts_with("scripts/") || first == "bash") && words.len() > 1
}

/// The commands of one markdown file: lines of `sh` blocks (continuations joined, `VAR=value`
/// prefixes and comments dropped, `&&` chains split), and inline code that starts with a program.
fn commands(path: &Path) -> Vec<DocCommand> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.strip_prefix(repo()).unwrap_or(path).display().to_string();
    let mut out = Vec::new();
    let mut block: Option<String> = None; // the language of the open fence
    let mut pending = String::new();
    let mut prose = String::new();
    for (i, line) in text.lines().enumerate() {
        let place = format!("{name}:{}", i + 1);
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            block = match block {
                None => Some(fence.trim().to_string()),
                Some(_) => None,
            };
            prose.push('\n');
            continue;
        }
        match &block {
            Some(lang) if lang == "sh" => {
                let code = line.split(" #").next().unwrap_or_default();
                let code = if code.trim_start().starts_with('#') { "" } else { code };
                pending.push_str(code.trim_end().trim_end_matches('\\'));
                pending.push(' ');
                if code.trim_end().ends_with('\\') {
                    continue;
                }
                for part in std::mem::take(&mut pending).split("&&") {
                    let mut words = split_words(part);
                    while words.first().is_some_and(|w| w.contains('=') && !w.starts_with('-')) {
                        words.remove(0);
                    }
                    if words.is_empty() {
                        continue;
                    }
                    assert!(is_command(&words), "{place}: `{}` is a command this test does not know", words.join(" "));
                    out.push(DocCommand { place: place.clone(), words });
                }
            }
            Some(_) => prose.push('\n'),
            None => {
                prose.push_str(line);
                prose.push('\n');
            }
        }
    }
    // Inline code may wrap over lines; fenced blocks were blanked above.
    let mut line = 1;
    let mut rest = prose.as_str();
    while let Some(open) = rest.find('`') {
        line += rest[..open].matches('\n').count();
        let after = &rest[open + 1..];
        let Some(close) = after.find('`') else { break };
        let span = after[..close].replace('\n', " ");
        let words = split_words(&span);
        if is_command(&words) && !span.contains('<') && !span.contains("...") {
            out.push(DocCommand { place: format!("{name}:{line}"), words });
        }
        line += after[..close].matches('\n').count();
        rest = &after[close + 1..];
    }
    out
}

fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The flags a `--help` text lists.
fn help_flags(program: &Path, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(program).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{} {} --help failed", program.display(), args.join(" "));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=') {
        if word.starts_with('-') && word.len() > 1 && word != "--" {
            flags.insert(word.trim_end_matches(['.', ')', ':']).to_string());
        }
    }
    flags
}

fn check_flags(cmd: &DocCommand, program: &Path, subcommand: &[&str], args: &[String]) {
    let known = help_flags(program, subcommand);
    for arg in args {
        if arg.starts_with('-') && arg.len() > 1 {
            let flag = arg.split('=').next().unwrap();
            assert!(
                known.contains(flag),
                "{}: `{}`: {flag} is not a flag of it ({known:?})",
                cmd.place,
                cmd.words.join(" ")
            );
        }
    }
}

fn check_pretrain(cmd: &DocCommand, args: &[String]) {
    let pretrain = bin("pretrain");
    let sub = args[0].as_str();
    let rest = &args[1..];
    check_flags(cmd, &pretrain, &[sub], rest);
    // The pure commands run for real when their files exist.
    let files: Vec<&String> = rest.iter().filter(|a| a.ends_with(".yaml")).collect();
    let runnable = match sub {
        "crd" => true,
        "validate" | "render" => !files.is_empty() && files.iter().all(|f| repo().join(f).exists()),
        _ => false,
    };
    if runnable {
        let out = Command::new(&pretrain).args(args).current_dir(repo()).output().unwrap();
        assert!(
            out.status.success(),
            "{}: `{}` failed: {}",
            cmd.place,
            cmd.words.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn check_worker(cmd: &DocCommand, args: &[String]) {
    let stages = ["data-prep", "tokenize", "train", "long-context", "eval"];
    assert!(stages.contains(&args[0].as_str()), "{}: `{}`: no stage {}", cmd.place, cmd.words.join(" "), args[0]);
    check_flags(cmd, &bin("pretrain-worker"), &[], &args[1..]);
}

/// The CRDs as `pretrain crd` prints them.
fn crds() -> Vec<Value> {
    let out = Command::new(bin("pretrain")).arg("crd").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---\n").map(|doc| serde_yaml::from_str::<Value>(doc).unwrap()).filter(|v| !v.is_null()).collect()
}

/// The CRD a kubectl resource name means (plural, singular, short name, or kind).
fn crd_named<'a>(crds: &'a [Value], name: &str) -> Option<&'a Value> {
    crds.iter().find(|crd| {
        let names = &crd["spec"]["names"];
        [&names["plural"], &names["singular"], &names["kind"]].iter().any(|n| n.as_str() == Some(name))
            || names["shortNames"].as_array().is_some_and(|s| s.iter().any(|n| n.as_str() == Some(name)))
    })
}

/// Whether `fields` (`spec.data`, `status.reason`) is a path in the CRD's schema.
fn schema_has(crd: &Value, fields: &[&str]) -> bool {
    let mut node = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for field in fields {
        if node["type"] == "array" {
            node = &node["items"];
        }
        node = &node["properties"][*field];
        if node.is_null() {
            return false;
        }
    }
    true
}

/// `kubectl -n NS port-forward svc/NAME PORT`: the chart, installed as the README installs it
/// (release `pretrain` in `pretrain-system`), has that Service in that namespace with that port.
fn check_port_forward(cmd: &DocCommand, args: &[String]) {
    let shown = cmd.words.join(" ");
    let namespace = args.windows(2).find(|w| w[0] == "-n").map(|w| w[1].as_str()).unwrap_or("default");
    let rest: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| *a != "-n" && (*i == 0 || args[i - 1] != "-n"))
        .map(|(_, a)| a)
        .collect();
    let (Some(service), Some(port)) = (rest.get(1).and_then(|t| t.strip_prefix("svc/")), rest.get(2)) else {
        panic!("{}: `{shown}`: expected port-forward svc/NAME PORT", cmd.place)
    };
    let objects = chart::install("pretrain", "pretrain-system", &json!({}));
    let found = objects
        .iter()
        .find(|o| {
            o["kind"] == "Service" && o["metadata"]["name"] == *service && o["metadata"]["namespace"] == namespace
        })
        .unwrap_or_else(|| panic!("{}: `{shown}`: the chart has no Service {namespace}/{service}", cmd.place));
    let ports: Vec<String> = found["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].to_string()).collect();
    assert!(ports.contains(port), "{}: `{shown}`: Service {service} has ports {ports:?}", cmd.place);
}

fn check_kubectl(cmd: &DocCommand, args: &[String], crds: &[Value]) {
    let shown = cmd.words.join(" ");
    if args.iter().any(|a| a == "port-forward") {
        return check_port_forward(cmd, args);
    }
    // Clearing a quarantined node: the taint is the operator's.
    if matches!(args[0].as_str(), "cordon" | "uncordon") {
        return;
    }
    if args[0] == "taint" {
        assert_eq!(args.get(1).map(String::as_str), Some("nodes"), "{}: `{shown}`", cmd.place);
        let taint = pretrain_operator::k8s::quarantine::TAINT;
        assert!(args.iter().any(|a| a.starts_with(taint)), "{}: `{shown}`: not the taint {taint}", cmd.place);
        return;
    }
    let verb = args[0].as_str();
    assert!(
        matches!(verb, "apply" | "get" | "describe" | "explain" | "delete" | "edit"),
        "{}: `{shown}`: verb",
        cmd.place
    );
    let mut i = 1;
    let mut resource: Option<&Value> = None;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-f" => {
                let file = repo().join(&args[i + 1]);
                if file.exists() {
                    let out = Command::new(bin("pretrain")).arg("validate").arg(&file).output().unwrap();
                    assert!(out.status.success(), "{}: `{shown}`: {}", cmd.place, String::from_utf8_lossy(&out.stdout));
                }
                i += 2;
                continue;
            }
            "-o" => {
                let format = &args[i + 1];
                if let Some(path) = format.strip_prefix("jsonpath=") {
                    let path = path.trim_start_matches('{').trim_end_matches('}').trim_start_matches('.');
                    let crd =
                        resource.unwrap_or_else(|| panic!("{}: `{shown}`: jsonpath without a resource", cmd.place));
                    let fields: Vec<&str> = path.split('.').collect();
                    assert!(schema_has(crd, &fields), "{}: `{shown}`: {path} is not in the CRD", cmd.place);
                }
                i += 2;
                continue;
            }
            "-n" => {
                i += 2;
                continue;
            }
            "-l" => {
                check_selector(cmd, &shown, &args[i + 1]);
                i += 2;
                continue;
            }
            "-w" | "--watch" | "-A" => {}
            "jobs" | "pods" if verb == "get" && resource.is_none() => {
                // The operator's own objects: they are checked by their labels.
                assert!(args.iter().any(|a| a == "-l"), "{}: `{shown}`: {a} without a selector", cmd.place);
            }
            _ if a.starts_with('-') => panic!("{}: `{shown}`: flag {a} is not checked here", cmd.place),
            _ if resource.is_none() && verb != "apply" => {
                let (name, path) = a.split_once('.').map_or((a, None), |(n, p)| (n, Some(p)));
                let crd = crd_named(crds, name).unwrap_or_else(|| {
                    panic!("{}: `{shown}`: {name} is not a PretrainRun or PretrainQueue name", cmd.place)
                });
                if let Some(path) = path {
                    let fields: Vec<&str> = path.split('.').collect();
                    assert!(schema_has(crd, &fields), "{}: `{shown}`: {path} is not in the CRD", cmd.place);
                }
                resource = Some(crd);
            }
            _ => {} // an object's name
        }
        i += 1;
    }
}

/// A label selector (`-l`) of the labels the operator puts on its Jobs and pods.
fn check_selector(cmd: &DocCommand, shown: &str, selector: &str) {
    use pretrain_operator::labels::{LABEL_ATTEMPT, LABEL_ROLE, LABEL_RUN, LABEL_STAGE};
    for term in selector.split(',') {
        let key = term.split_once('=').map_or(term, |(k, _)| k);
        assert!(
            [LABEL_RUN, LABEL_STAGE, LABEL_ATTEMPT, LABEL_ROLE].contains(&key),
            "{}: `{shown}`: {key} is not a label the operator sets",
            cmd.place
        );
    }
}

/// `--set a.b=v`: `{"a": {"b": v}}`, with `v` read as YAML does (numbers, booleans, strings).
fn set_value(path: &str, value: Value) -> Value {
    path.rsplit('.').fold(value, |inner, key| json!({ key: inner }))
}

fn check_helm(cmd: &DocCommand, args: &[String]) {
    let shown = cmd.words.join(" ");
    assert_eq!(args[0], "install", "{}: `{shown}`", cmd.place);
    let (release, chart_dir) = (&args[1], &args[2]);
    assert_eq!(repo().join(chart_dir).canonicalize().unwrap(), chart::chart().canonicalize().unwrap(), "{}", cmd.place);
    let mut namespace = "default".to_string();
    let mut overrides = json!({});
    let mut i = 3;
    while i < args.len() {
        match args[i].as_str() {
            "-n" | "--namespace" => namespace = args[i + 1].clone(),
            "--set" | "--set-json" => {
                let (path, raw) = args[i + 1].split_once('=').unwrap();
                let value: Value = if args[i] == "--set" {
                    serde_yaml::from_str(raw).unwrap()
                } else {
                    serde_json::from_str(raw).unwrap_or_else(|e| panic!("{}: `{shown}`: {e}", cmd.place))
                };
                chart::merge(&mut overrides, &set_value(path, value));
            }
            "--create-namespace" => {
                i += 1;
                continue;
            }
            other => panic!("{}: `{shown}`: flag {other} is not checked here", cmd.place),
        }
        i += 2;
    }
    let objects = chart::install(release, &namespace, &overrides);
    chart::validate(&objects);
}

/// Package name to directory, from each member's Cargo.toml.
fn package_dir(name: &str) -> Option<PathBuf> {
    ["crd", "store", "operator", "worker", "tests"].iter().map(|d| repo().join(d)).find(|dir| {
        std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains(&format!("name = \"{name}\"")))
    })
}

fn check_cargo(cmd: &DocCommand, args: &[String]) {
    let shown = cmd.words.join(" ");
    assert!(matches!(args[0].as_str(), "test" | "bench" | "build" | "run"), "{}: `{shown}`", cmd.place);
    let mut package = None;
    let mut target: Option<(&str, &str)> = None;
    let mut filter = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "--" => break,
            "-p" | "--package" => package = Some(args[i + 1].clone()),
            "--test" | "--bench" | "--bin" => target = Some((a, &args[i + 1])),
            "--features" => {
                let dir = package_dir(package.as_deref().unwrap_or("pretrain-operator")).unwrap();
                let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
                for feature in args[i + 1].split(',') {
                    assert!(
                        manifest.contains(&format!("\n{feature} = [")),
                        "{}: `{shown}`: no feature {feature}",
                        cmd.place
                    );
                }
            }
            "--release" | "--workspace" | "--locked" | "--quiet" => {
                i += 1;
                continue;
            }
            _ if a.starts_with('-') => panic!("{}: `{shown}`: flag {a} is not checked here", cmd.place),
            _ => {
                filter = Some(a.to_string());
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    let Some(package) = package else { return };
    let dir = package_dir(&package).unwrap_or_else(|| panic!("{}: `{shown}`: no package {package}", cmd.place));
    let Some((kind, name)) = target else { return };
    let file = match kind {
        "--test" => dir.join("tests").join(format!("{name}.rs")),
        "--bench" => dir.join("benches").join(format!("{name}.rs")),
        _ => dir.join("src/bin").join(format!("{name}.rs")),
    };
    let source =
        std::fs::read_to_string(&file).unwrap_or_else(|_| panic!("{}: `{shown}`: no {}", cmd.place, file.display()));
    if let Some(filter) = filter {
        let names: Vec<&str> = source.lines().filter_map(|l| l.trim_start().strip_prefix("fn ")).collect();
        assert!(names.iter().any(|n| n.contains(&filter)), "{}: `{shown}`: no test matches {filter}", cmd.place);
    }
}

fn check_script(cmd: &DocCommand, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = repo().join(script);
    let meta = std::fs::metadata(&path).unwrap_or_else(|_| panic!("{}: no {script}", cmd.place));
    assert!(meta.permissions().mode() & 0o111 != 0, "{}: {script} is not executable", cmd.place);
}

#[test]
fn every_command_in_the_docs_is_exercised() {
    let crds = crds();
    let mut checked = 0;
    let mut programs = BTreeSet::new();
    for file in doc_files() {
        for cmd in commands(&file) {
            let program = cmd.words[0].as_str();
            let args = &cmd.words[1..];
            match program {
                "pretrain" | "./target/release/pretrain" => check_pretrain(&cmd, args),
                "pretrain-worker" => check_worker(&cmd, args),
                "kubectl" => check_kubectl(&cmd, args, &crds),
                "helm" => check_helm(&cmd, args),
                "cargo" => check_cargo(&cmd, args),
                "bash" => check_script(&cmd, &args[0]),
                script => check_script(&cmd, script),
            }
            programs.insert(program.trim_start_matches("./target/release/").split('/').next().unwrap().to_string());
            checked += 1;
        }
    }
    eprintln!("{checked} commands checked: {programs:?}");
    for program in ["pretrain", "pretrain-worker", "kubectl", "helm", "cargo", "scripts"] {
        assert!(programs.contains(program), "no {program} command found: the extraction is broken");
    }
}

#[test]
fn a_wrong_command_is_caught() {
    let place = "test".to_string();
    let cmd = |line: &str| DocCommand { place: place.clone(), words: split_words(line) };
    let fails = |line: &str, check: &dyn Fn(&DocCommand)| {
        let c = cmd(line);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&c))).is_err()
    };
    let crds = crds();
    assert!(fails("pretrain run FILE --wrokers 2", &|c| check_pretrain(c, &c.words[1..])));
    assert!(!fails("pretrain run FILE --workers 2", &|c| check_pretrain(c, &c.words[1..])));
    assert!(fails("pretrain-worker training --spec F", &|c| check_worker(c, &c.words[1..])));
    assert!(fails("kubectl get ptx", &|c| check_kubectl(c, &c.words[1..], &crds)));
    assert!(fails("kubectl -n pretrain-system port-forward svc/pretrain-ui 8090", &|c| check_kubectl(
        c,
        &c.words[1..],
        &crds
    )));
    assert!(fails("kubectl -n pretrain-system port-forward svc/pretrain-dashboard 80", &|c| check_kubectl(
        c,
        &c.words[1..],
        &crds
    )));
    assert!(!fails("kubectl -n pretrain-system port-forward svc/pretrain-dashboard 8090", &|c| check_kubectl(
        c,
        &c.words[1..],
        &crds
    )));
    assert!(fails("kubectl get ptr x -o jsonpath='{.status.nope}'", &|c| check_kubectl(c, &c.words[1..], &crds)));
    assert!(!fails("kubectl get ptr x -o jsonpath='{.status.reason}'", &|c| check_kubectl(c, &c.words[1..], &crds)));
    assert!(fails("kubectl explain pretrainrun.spec.nope", &|c| check_kubectl(c, &c.words[1..], &crds)));
    assert!(fails("helm install p charts/pretrain-operator --set replicas=many", &|c| check_helm(c, &c.words[1..])));
    assert!(fails("cargo test -p pretrain-tests --test reliability no_such_test", &|c| check_cargo(c, &c.words[1..])));
    assert!(fails("cargo build -p pretrain-worker --features ncl", &|c| check_cargo(c, &c.words[1..])));
    assert_eq!(split_words("a 'b c' \"d\" e=\"f g\""), ["a", "b c", "d", "e=f g"]);
}
