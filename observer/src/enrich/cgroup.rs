//! The service behind a process: its cgroup v2 path (`/proc/PID/cgroup`) and what the path
//! says about it: the systemd unit, a container and a Kubernetes pod.
//!
//! Servers run services, and the cgroup is where service managers put them: systemd gives
//! every unit its own cgroup (`/system.slice/nginx.service`, `/user.slice/user-1000.slice/
//! session-2.scope`), container runtimes one per container (docker's `docker-<id>.scope` or
//! `/docker/<id>`, containerd's `cri-containerd-<id>.scope`, cri-o's `crio-<id>.scope`,
//! podman's `libpod-<id>.scope`) and the kubelet one per pod (`kubepods-burstable-pod<uid>.slice`
//! with the systemd driver, `/kubepods/burstable/pod<uid>/` with the cgroupfs driver).
//!
//! The path is read from the `0::` line (the unified hierarchy: the only line on a pure v2
//! host; on a hybrid host such as one with v1 controllers and cgroup2 at
//! `/sys/fs/cgroup/unified`, systemd mirrors its tree there). A v1-only host has no `0::` line:
//! then the `name=systemd` line, which holds the same tree. [`parse_path`] is pure: a path of a
//! shape it does not know keeps its `cgroup` and gets no unit, container or pod.
use std::{io, path::Path};

/// The most of `/proc/PID/cgroup` read: one line per v1 hierarchy plus the v2 path; cgroup
/// paths are short in practice, and a longer file is cut (its `0::` line comes last only on
/// hybrid hosts, where the v1 lines are short).
pub const PROC_CGROUP_MAX: usize = 8192;

/// What a process's cgroup path says about the service it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Service {
    /// The cgroup v2 path, relative to the cgroup2 mount (`/system.slice/nginx.service`).
    pub cgroup: String,
    /// The systemd unit: the deepest `.service` or `.scope` in the path (`nginx.service`; a
    /// user's own unit inside `user@1000.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The container runtime: `docker`, `containerd`, `cri-o` or `podman`; absent when the
    /// path names a container but not its runtime (`/kubepods/.../pod<uid>/<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_runtime: Option<String>,
    /// The container id (hexadecimal, as the runtime names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The Kubernetes pod uid (`8-4-4-4-12` hexadecimal with dashes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Service {
    /// A short label for a terminal: the unit, else `runtime:id12`, else the path.
    pub fn label(&self) -> String {
        match (&self.unit, &self.container_id) {
            (Some(unit), None) => unit.clone(),
            (_, Some(id)) => format!(
                "{}:{}",
                self.container_runtime.as_deref().unwrap_or("container"),
                id.get(..12).unwrap_or(id)
            ),
            (None, None) => self.cgroup.clone(),
        }
    }
}

/// The cgroup path in `/proc/PID/cgroup` text (pure): the `0::` line's, else the
/// `name=systemd` line's; `None` when neither is there.
pub fn proc_cgroup_path(text: &str) -> Option<&str> {
    let mut systemd = None;
    for line in text.lines() {
        // hierarchy-ID:controller-list:path; the path itself may contain ':'.
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        if id == "0" && controllers.is_empty() {
            return Some(path);
        }
        if controllers == "name=systemd" {
            systemd = Some(path);
        }
    }
    systemd
}

/// What a cgroup path says (pure); see the module docs for the shapes known.
pub fn parse_path(path: &str) -> Service {
    let mut service = Service {
        cgroup: path.to_owned(),
        unit: None,
        container_runtime: None,
        container_id: None,
        pod_uid: None,
    };
    let mut under_kubepods = false;
    let mut previous = "";
    for component in path.split('/').filter(|c| !c.is_empty()) {
        // containerd's systemd driver inside a unit: `kubepods-...-pod<uid>.slice:cri-containerd:<id>`.
        let mut parts = component.splitn(3, ':');
        let head = parts.next().unwrap_or(component);
        if let (Some(runtime), Some(id)) = (parts.next(), parts.next()) {
            if let Some(uid) = pod_slice_uid(head) {
                service.pod_uid = Some(uid);
            }
            if is_container_id(id) {
                service.container_runtime = Some(runtime_name(runtime).to_owned());
                service.container_id = Some(id.to_owned());
            }
            previous = component;
            continue;
        }
        if component == "kubepods" || component.starts_with("kubepods-") {
            under_kubepods = true;
        }
        if let Some(uid) = pod_slice_uid(component) {
            service.pod_uid = Some(uid);
        } else if under_kubepods
            && let Some(uid) = component.strip_prefix("pod")
            && is_pod_uid(uid)
        {
            service.pod_uid = Some(uid.to_owned());
        }
        if is_unit_name(component) {
            service.unit = Some(component.to_owned());
        }
        if let Some((runtime, id)) = scope_container(component) {
            service.container_runtime = Some(runtime.to_owned());
            service.container_id = Some(id.to_owned());
        } else if is_container_id(component) {
            // cgroupfs drivers: `/docker/<id>`, `/kubepods/<qos>/pod<uid>/<id>`.
            if previous == "docker" {
                service.container_runtime = Some("docker".to_owned());
                service.container_id = Some(component.to_owned());
            } else if previous.starts_with("pod") && under_kubepods {
                service.container_runtime = None;
                service.container_id = Some(component.to_owned());
            }
        }
        previous = component;
    }
    service
}

/// The service of process directory `proc_pid` (`/proc/PID`): `None` when its cgroup file is
/// gone (the process exited) or names no path.
pub fn read_service(proc_pid: &Path) -> Option<Service> {
    let bytes = read_prefix(&proc_pid.join("cgroup"), PROC_CGROUP_MAX).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    proc_cgroup_path(&text).map(parse_path)
}

/// The cgroup2 mount point in `/proc/self/mountinfo` text (pure): the first mount of
/// filesystem type `cgroup2` (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = before.split(' ').nth(4)?;
        Some(unescape_octal(mount_point))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN` octal.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads at most `limit` bytes of a file (proc files can be long; we need their start).
pub(crate) fn read_prefix(path: &Path, limit: usize) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(u64::try_from(limit).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A systemd unit with a cgroup of its own: a service or a scope (slices only group them).
fn is_unit_name(component: &str) -> bool {
    let stem = component
        .strip_suffix(".service")
        .or_else(|| component.strip_suffix(".scope"));
    stem.is_some_and(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":_.\\@-".contains(&b))
    })
}

/// `docker-<id>.scope` and its kind: the runtime and the id.
fn scope_container(component: &str) -> Option<(&'static str, &str)> {
    let stem = component.strip_suffix(".scope")?;
    let (prefix, id) = stem.rsplit_once('-')?;
    let runtime = match prefix {
        "docker" => "docker",
        "cri-containerd" => "containerd",
        "crio" => "cri-o",
        "libpod" => "podman",
        _ => return None,
    };
    is_container_id(id).then_some((runtime, id))
}

fn runtime_name(prefix: &str) -> &str {
    match prefix {
        "cri-containerd" => "containerd",
        "crio" => "cri-o",
        "libpod" => "podman",
        other => other,
    }
}

/// Container ids are hexadecimal: 64 digits for docker, containerd and cri-o.
fn is_container_id(text: &str) -> bool {
    (12..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `kubepods-burstable-pod<uid with _>.slice` (or `kubepods-pod<uid>.slice`): the uid.
fn pod_slice_uid(component: &str) -> Option<String> {
    let stem = component.strip_suffix(".slice")?;
    if !stem.starts_with("kubepods-") {
        return None;
    }
    let uid = stem.rsplit_once("-pod")?.1.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A pod uid: a UUID, `8-4-4-4-12` hexadecimal digits.
fn is_pod_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c2a9e3b7d8c6a5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d";
    const UID: &str = "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d";

    fn parts(
        path: &str,
    ) -> (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ) {
        let s = parse_path(path);
        assert_eq!(s.cgroup, path);
        (s.unit, s.container_runtime, s.container_id, s.pod_uid)
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn proc_cgroup_lines() {
        let v2 = "0::/system.slice/nginx.service\n";
        assert_eq!(proc_cgroup_path(v2), Some("/system.slice/nginx.service"));
        let hybrid = "12:pids:/system.slice/nginx.service\n1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n";
        assert_eq!(
            proc_cgroup_path(hybrid),
            Some("/system.slice/nginx.service")
        );
        let v1 = "4:memory:/x\n1:name=systemd:/system.slice/sshd.service\n";
        assert_eq!(proc_cgroup_path(v1), Some("/system.slice/sshd.service"));
        // A path may hold ':' (containerd's systemd driver).
        let colon = "0::/system.slice/containerd.service/kubepods.slice:cri-containerd:abc\n";
        assert_eq!(
            proc_cgroup_path(colon),
            Some("/system.slice/containerd.service/kubepods.slice:cri-containerd:abc")
        );
        assert_eq!(proc_cgroup_path(""), None);
        assert_eq!(proc_cgroup_path("garbage\n0:\n4:memory:/x\n"), None);
        assert_eq!(proc_cgroup_path("0::relative\n"), None);
    }

    #[test]
    fn systemd_units() {
        assert_eq!(
            parts("/system.slice/nginx.service"),
            (some("nginx.service"), None, None, None)
        );
        assert_eq!(
            parts("/user.slice/user-1000.slice/session-2.scope"),
            (some("session-2.scope"), None, None, None)
        );
        // A user's own unit inside the user manager; a unit's delegated sub-cgroup.
        assert_eq!(
            parts("/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo@1.service").0,
            some("app-foo@1.service")
        );
        assert_eq!(
            parts("/system.slice/postgresql@16-main.service/payload").0,
            some("postgresql@16-main.service")
        );
        // Slices, the root, and unknown shapes: the path only.
        assert_eq!(parts("/system.slice"), (None, None, None, None));
        assert_eq!(parts("/"), (None, None, None, None));
        assert_eq!(parts("/my/own/tree"), (None, None, None, None));
        assert_eq!(parts("/.service"), (None, None, None, None));
        assert_eq!(parts("/bad name.service").0, None);
    }

    #[test]
    fn containers() {
        assert_eq!(
            parts(&format!("/system.slice/docker-{ID}.scope")),
            (
                some(&format!("docker-{ID}.scope")),
                some("docker"),
                some(ID),
                None
            )
        );
        assert_eq!(
            parts(&format!("/docker/{ID}")),
            (None, some("docker"), some(ID), None)
        );
        assert_eq!(
            parts(&format!("/machine.slice/libpod-{ID}.scope")).1,
            some("podman")
        );
        // Not a container: a scope whose "id" is not hexadecimal, a bare id elsewhere.
        assert_eq!(parts("/system.slice/docker-notanid.scope").2, None);
        assert_eq!(parts(&format!("/other/{ID}")).2, None);
    }

    #[test]
    fn kubernetes_pods() {
        let slice_uid = UID.replace('-', "_");
        // systemd cgroup driver.
        assert_eq!(
            parts(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{ID}.scope"
            )),
            (
                some(&format!("cri-containerd-{ID}.scope")),
                some("containerd"),
                some(ID),
                some(UID)
            )
        );
        assert_eq!(
            parts(&format!(
                "/kubepods.slice/kubepods-pod{slice_uid}.slice/crio-{ID}.scope"
            )),
            (
                some(&format!("crio-{ID}.scope")),
                some("cri-o"),
                some(ID),
                some(UID)
            )
        );
        // cgroupfs driver: the runtime is not in the path.
        assert_eq!(
            parts(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            (None, None, some(ID), some(UID))
        );
        // containerd's systemd driver nested in its own unit.
        assert_eq!(
            parts(&format!(
                "/system.slice/containerd.service/kubepods-besteffort-pod{slice_uid}.slice:cri-containerd:{ID}"
            )),
            (
                some("containerd.service"),
                some("containerd"),
                some(ID),
                some(UID)
            )
        );
        // A pod slice with a malformed uid: no pod.
        assert_eq!(
            parts("/kubepods.slice/kubepods-burstable-podnotauid.slice").3,
            None
        );
        assert_eq!(parts("/pod0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d").3, None);
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_path("/system.slice/nginx.service").label(),
            "nginx.service"
        );
        assert_eq!(
            parse_path(&format!("/system.slice/docker-{ID}.scope")).label(),
            "docker:4f1c2a9e3b7d"
        );
        assert_eq!(parse_path("/my/tree").label(), "/my/tree");
    }

    #[test]
    fn serialized_fields() -> serde_json::Result<()> {
        let json = serde_json::to_value(parse_path("/system.slice/nginx.service"))?;
        assert_eq!(
            json,
            serde_json::json!({"cgroup": "/system.slice/nginx.service", "unit": "nginx.service"})
        );
        Ok(())
    }

    #[test]
    fn mountinfo_cgroup2() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let v2 = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(v2).as_deref(), Some("/sys/fs/cgroup"));
        let escaped = "30 23 0:27 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(escaped).as_deref(), Some("/mnt/my cgroups"));
        assert_eq!(
            cgroup2_mount("32 31 0:29 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup2_mount("nonsense\n - cgroup2\n"), None);
    }

    #[test]
    fn reads_this_process() {
        // Every Linux process has a cgroup file; its path parses whatever it is.
        let service = read_service(Path::new("/proc/self"));
        if let Some(service) = service {
            assert!(service.cgroup.starts_with('/'), "{service:?}");
        }
        assert_eq!(read_service(Path::new("/nonexistent/observer")), None);
    }
}

#[cfg(test)]
mod proptests {
    //! `/proc/PID/cgroup` and `/proc/self/mountinfo` of any shape, and cgroup paths the parser
    //! does not know: a path (or none) and what it names, never a panic.
    use proptest::prelude::*;

    use super::*;
    use crate::prop_support::{self, assert_bounded};

    const PROC_CGROUP: &str = "12:pids:/system.slice/nginx.service\n1:name=systemd:/system.slice/nginx.service\n0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6a7b_8c9d_0e1f2a3b4c5d.slice/cri-containerd-4f1c2a9e3b7d8c6a5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d.scope\n";
    const MOUNTINFO: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";

    fn check(text: &str) -> Result<(), TestCaseError> {
        let service = assert_bounded(text.len(), 16, 4096, || {
            proc_cgroup_path(text).map(parse_path)
        })?;
        if let Some(service) = service {
            prop_assert!(text.contains(&service.cgroup));
            let _ = service.label();
        }
        let _ = parse_path(text).label();
        let _ = cgroup2_mount(text);
        Ok(())
    }

    proptest! {
        #![proptest_config(prop_support::config())]

        #[test]
        fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
            check(&text)?;
        }

        #[test]
        fn path_shaped_text_never_panics(
            path in r"(/(kubepods|docker|pod[0-9a-f_-]{0,40}|[a-z@:_.-]{0,12}(\.service|\.scope|\.slice)?|[0-9a-f]{12,64}|[a-z-]{0,16}-[0-9a-f]{0,70}\.scope|[a-z]{0,8}:[a-z-]{0,14}:[0-9a-f]{0,64})){0,8}",
        ) {
            check(&format!("0::{path}\n"))?;
        }

        #[test]
        fn mutated_proc_files_never_panic(text in prop_support::mutated_text(&[PROC_CGROUP, MOUNTINFO])) {
            check(&text)?;
        }
    }
}
