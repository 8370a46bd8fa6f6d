//! Every illumos typedef the project declares itself, against the typedefs
//! measured from the real headers (`test/abi/illumos-typedefs.tsv`, a copy
//! of `shared/illumos-abi/illumos-typedefs.tsv`: name, the C type it stands
//! for, header), as `tests/abi.rs` checks the layouts:
//!
//! - the minimal declarations CI builds the shim with
//!   (`c-shim/minimal/rvscsi_illumos.h`) and the typedefs `c-shim/rvscsi.h`
//!   declares when read alone (by bindgen): each must stand for the same C
//!   type as in illumos, with typedef names followed on each side to what
//!   they name (so `typedef ulong_t size_t;` and `typedef unsigned long
//!   size_t;` agree, while `struct dev_info` and `struct __dev_info *`, or
//!   `unsigned long` and `unsigned long long`, do not);
//! - the Rust mirrors (`src/ffi/types.rs`): a `pub type` alias named after
//!   an illumos typedef must have its shape (the same pointer depth, struct
//!   tags, integer width and signedness, function signature), and a struct
//!   so named must mirror a typedef of a struct, never of a pointer.
//!
//! Names starting with `rvscsi_` are the project's own; any other name not
//! in the table fails (the Rust side lists its few own `_t` names below).
//!
//! The same resolution checks the rest of the minimal declarations against
//! the other measured tables: every member of every structure they declare
//! against `illumos-amd64-fields.tsv` (its C type), and every function they
//! declare against `illumos-ddi-functions.tsv` (return and parameter types).
//!
//! The copy itself is compared with the provided original
//! (`RVSCSI_SHARED/illumos-abi/`, by default `../shared/` beside the
//! repository, as in CI); without it that test fails unless
//! `RVSCSI_NO_SHARED=1` says the absence is on purpose.

use std::collections::HashMap;

const TSV: &str = include_str!("../test/abi/illumos-typedefs.tsv");
const MINIMAL: &str = include_str!("../c-shim/minimal/rvscsi_illumos.h");
const CONTRACT: &str = include_str!("../c-shim/rvscsi.h");
const MIRRORS: &str = include_str!("../src/ffi/types.rs");
const FIELDS: &str = include_str!("../test/abi/illumos-amd64-fields.tsv");
const FUNCTIONS: &str = include_str!("../test/abi/illumos-ddi-functions.tsv");

/// Rust names in `src/ffi/types.rs` that end in `_t` like an illumos
/// typedef but are the project's own (no such typedef exists in illumos).
const RUST_OWN_T_NAMES: &[&str] = &[
    // A pointer-sized `int (*)(caddr_t)` that may be the DDI's magic
    // values DDI_DMA_SLEEP / DDI_DMA_DONTWAIT.
    "ddi_callback_t",
    // The same argument with its exact C type, `int (*)(caddr_t)`.
    "ddi_waitfp_t",
];

/// A C type, with typedef names resolved away.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ty {
    /// An integer: C rank (1 char, 2 short, 3 int, 4 long, 5 long long),
    /// signedness. Plain `char` is signed on amd64.
    Int(u8, bool),
    Void,
    Bool,
    /// `struct TAG` / `union TAG`, `<anon>` for an anonymous one.
    Struct(String),
    /// `enum TAG` or `enum <anon>`.
    Enum(String),
    Ptr(Box<Ty>),
    /// A function type: return, parameters.
    Fn(Box<Ty>, Vec<Ty>),
    /// An array: element, length.
    Array(Box<Ty>, String),
    /// A compiler builtin such as `__builtin_va_list`.
    Builtin(String),
    /// A name that resolves to nothing on its side.
    Unknown(String),
}

/// The bytes of an integer of C rank `r` on amd64 (LP64).
fn rank_bytes(r: u8) -> u8 {
    match r {
        1 => 1,
        2 => 2,
        3 => 4,
        _ => 8,
    }
}

/// Splits `s` at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut parts) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(s[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

/// Where the `(` matching the `)` at byte `close` of `s` is.
fn matching_open(s: &str, close: usize) -> usize {
    let mut depth = 0i32;
    for (i, c) in s[..=close].char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {s:?}")
}

/// Parses a C type name (an abstract declarator, as the table spells
/// them: `struct __dev_info *`, `uint_t (caddr_t, caddr_t)`,
/// `int (*)(caddr_t)`), resolving typedef names through `names`.
fn c_type(s: &str, names: &HashMap<String, String>, depth: u32) -> Ty {
    assert!(depth < 32, "typedef chain too deep at {s:?}");
    let s = s.trim();
    if let Some(stripped) = s.strip_suffix(')') {
        let close = stripped.len();
        let open = matching_open(s, close);
        let params: Vec<Ty> = split_top(&s[open + 1..close])
            .into_iter()
            .filter(|p| *p != "void")
            .map(|p| c_type(p, names, depth + 1))
            .collect();
        let head = s[..open].trim();
        return match head.strip_suffix("(*)") {
            Some(ret) => Ty::Ptr(Box::new(Ty::Fn(
                Box::new(c_type(ret, names, depth + 1)),
                params,
            ))),
            None => Ty::Fn(Box::new(c_type(head, names, depth + 1)), params),
        };
    }
    if let Some(pointee) = s.strip_suffix('*') {
        return Ty::Ptr(Box::new(c_type(pointee, names, depth + 1)));
    }
    if let Some(head) = s.strip_suffix(']') {
        let open = head.rfind('[').expect("an array bound");
        return Ty::Array(
            Box::new(c_type(&head[..open], names, depth + 1)),
            head[open + 1..].trim().to_string(),
        );
    }
    let words: Vec<&str> = s
        .split_whitespace()
        .filter(|w| !["const", "volatile"].contains(w))
        .collect();
    match words.as_slice() {
        ["struct" | "union", tag] => return Ty::Struct(tag.to_string()),
        ["enum", tag] => return Ty::Enum(tag.to_string()),
        ["void"] => return Ty::Void,
        ["_Bool"] => return Ty::Bool,
        [w] if w.starts_with("__builtin_") => return Ty::Builtin(w.to_string()),
        [name] if !["char", "short", "int", "long", "signed", "unsigned"].contains(name) => {
            return match names.get(*name) {
                Some(t) => c_type(t, names, depth + 1),
                None => Ty::Unknown(name.to_string()),
            };
        }
        _ => {}
    }
    let has = |w: &str| words.contains(&w);
    let longs = words.iter().filter(|w| **w == "long").count();
    let rank = if has("char") {
        1
    } else if has("short") {
        2
    } else if longs == 2 {
        5
    } else if longs == 1 {
        4
    } else if has("int") || has("signed") || has("unsigned") {
        3
    } else {
        return Ty::Unknown(s.to_string());
    };
    Ty::Int(rank, !has("unsigned"))
}

/// The measured typedefs: name -> C type.
fn measured() -> HashMap<String, String> {
    let mut m = HashMap::new();
    for line in TSV.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert!(cols.len() >= 2, "a table row: {line:?}");
        m.insert(cols[0].to_string(), cols[1].to_string());
    }
    assert!(m.len() > 800, "the table has the measured typedefs");
    m
}

/// C source without comments and preprocessor lines.
fn c_code(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(at) = rest.find("/*") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find("*/").expect("a closed comment");
        rest = &rest[at + end + 2..];
    }
    out.push_str(rest);
    out.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The typedefs a C header declares: (name, the C type as an abstract
/// declarator in the table's spelling). Braced bodies become their tag
/// (`struct mutex`, `enum <anon>`). Only the project's own `rvscsi_`
/// names may use other declarator forms, and they are left out.
fn c_typedefs(src: &str) -> Vec<(String, String)> {
    let code = c_code(src);
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("typedef") {
        // Whole word only.
        let before = rest[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            rest = &rest[at + 7..];
            continue;
        }
        let body = &rest[at + 7..];
        // The end: the first ';' outside braces.
        let (mut depth, mut end) = (0i32, None);
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ';' if depth == 0 => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.expect("a typedef ends with ;");
        let mut decl = body[..end].split_whitespace().collect::<Vec<_>>().join(" ");
        rest = &body[end + 1..];
        if let Some(open) = decl.find('{') {
            let close = decl.rfind('}').expect("a closed body");
            let head = decl[..open].trim().to_string();
            let head = if head.split_whitespace().count() == 1 {
                format!("{head} <anon>")
            } else {
                head
            };
            decl = format!("{head} {}", decl[close + 1..].trim());
        }
        // The declared name: the last identifier, unless a function or
        // function-pointer declarator (the project's own only).
        if decl.contains('(') {
            let name_at = decl.find("rvscsi_");
            assert!(
                name_at.is_some(),
                "a function typedef that is not the project's (extend the test): {decl}"
            );
            continue;
        }
        let name_start = decl
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let name = decl[name_start..].to_string();
        let ty = decl[..name_start].trim().to_string();
        // The table writes `char *`, declarations `char *name`: the same.
        let ty = if let Some(base) = ty.strip_suffix('*') {
            format!("{} *", base.trim())
        } else {
            ty
        };
        found.push((name, ty));
    }
    found
}

/// Checks a header's typedefs against the table; the mismatches.
fn check_c_header(what: &str, src: &str) -> (usize, Vec<String>) {
    let table = measured();
    let decls = c_typedefs(src);
    let own: HashMap<String, String> = decls.iter().cloned().collect();
    let mut errors = Vec::new();
    let mut checked = 0;
    for (name, ty) in &decls {
        if name.starts_with("rvscsi_") {
            continue;
        }
        let Some(real) = table.get(name) else {
            errors.push(format!(
                "{what}: typedef {name} ({ty}) is not an illumos typedef"
            ));
            continue;
        };
        let ours = c_type(ty, &own, 0);
        let theirs = c_type(real, &table, 0);
        if ours != theirs {
            errors.push(format!(
                "{what}: typedef {name} is `{ty}` ({ours:?}); illumos declares `{real}` ({theirs:?})"
            ));
        }
        checked += 1;
    }
    (checked, errors)
}

#[test]
fn the_minimal_declarations_typedef_every_type_as_illumos_does() {
    let (checked, errors) = check_c_header("c-shim/minimal/rvscsi_illumos.h", MINIMAL);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 20, "checked only {checked} typedefs");
}

#[test]
fn the_contract_read_alone_typedefs_what_illumos_does() {
    let (checked, errors) = check_c_header("c-shim/rvscsi.h", CONTRACT);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 4, "checked only {checked} typedefs");
}

/// The Rust mirrors: aliases (`pub type NAME = TYPE;`) and structs
/// (`pub struct`, `pub union`, and the `opaque_types!` list).
struct Mirrors {
    aliases: HashMap<String, String>,
    structs: Vec<String>,
}

fn mirrors() -> Mirrors {
    let mut aliases = HashMap::new();
    let mut structs = Vec::new();
    let mut rest = MIRRORS;
    while let Some(at) = rest.find("pub type ") {
        let decl = &rest[at + 9..];
        let end = decl.find(';').expect("an alias ends with ;");
        let (name, ty) = decl[..end].split_once('=').expect("pub type NAME = TYPE");
        aliases.insert(
            name.trim().to_string(),
            ty.split_whitespace().collect::<Vec<_>>().join(" "),
        );
        rest = &decl[end..];
    }
    for line in MIRRORS.lines() {
        let l = line.trim();
        for kw in ["pub struct ", "pub union "] {
            if let Some(r) = l.strip_prefix(kw) {
                let name: String = r
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    structs.push(name);
                }
            }
        }
    }
    let list = MIRRORS
        .split("opaque_types! {")
        .nth(1)
        .expect("the opaque_types! list");
    let list = &list[..list.find('}').expect("the list ends")];
    for line in list.lines() {
        let l = line.trim();
        if !l.starts_with("//") && l.ends_with(';') {
            structs.push(l.trim_end_matches(';').to_string());
        }
    }
    assert!(
        structs.iter().any(|s| s == "scsi_pkt") && aliases.contains_key("caddr_t"),
        "parsed the mirrors"
    );
    Mirrors { aliases, structs }
}

/// A Rust type as a `Ty`; integers by width (Rust has no C ranks: `u64`
/// is `Int(4, false)`, matching `unsigned long` and `unsigned long long`
/// alike, see [`same_shape`]). A mirror struct is `Struct(its C tag)`:
/// its own name, or for a struct named after a typedef, the tag the
/// typedef names.
fn rust_type(s: &str, m: &Mirrors, table: &HashMap<String, String>, depth: u32) -> Ty {
    assert!(depth < 32, "alias chain too deep at {s:?}");
    let s = s.trim();
    if let Some(inner) = s.strip_prefix("Option<").and_then(|r| r.strip_suffix('>')) {
        // A nullable function pointer is the same C function pointer.
        return rust_type(inner, m, table, depth + 1);
    }
    if let Some(r) = s.strip_prefix("unsafe extern \"C\" fn") {
        let r = r.trim();
        let close = r.rfind(')').expect("a parameter list");
        let open = matching_open(r, close);
        let params = split_top(&r[open + 1..close])
            .into_iter()
            .map(|p| {
                // Named parameters: `name: TYPE`.
                let ty = p.split_once(':').map_or(p, |(_, t)| t);
                rust_type(ty, m, table, depth + 1)
            })
            .collect();
        let ret = match r[close + 1..].trim().strip_prefix("->") {
            Some(t) => rust_type(t, m, table, depth + 1),
            None => Ty::Void,
        };
        return Ty::Ptr(Box::new(Ty::Fn(Box::new(ret), params)));
    }
    for p in ["*mut ", "*const "] {
        if let Some(pointee) = s.strip_prefix(p) {
            return Ty::Ptr(Box::new(rust_type(pointee, m, table, depth + 1)));
        }
    }
    let name = s.rsplit("::").next().unwrap_or(s);
    let int = |bytes: u8, signed: bool| {
        Ty::Int(
            match bytes {
                1 => 1,
                2 => 2,
                4 => 3,
                _ => 4,
            },
            signed,
        )
    };
    match name {
        "u8" => int(1, false),
        "i8" | "c_char" => int(1, true),
        "u16" => int(2, false),
        "i16" => int(2, true),
        "u32" | "c_uint" => int(4, false),
        "i32" | "c_int" => int(4, true),
        "u64" | "usize" | "c_ulong" => int(8, false),
        "i64" | "isize" | "c_long" => int(8, true),
        "c_void" => Ty::Void,
        "bool" => Ty::Bool,
        _ => {
            if let Some(t) = m.aliases.get(name) {
                return rust_type(t, m, table, depth + 1);
            }
            if m.structs.iter().any(|s| s == name) {
                return match table.get(name).map(|t| c_type(t, table, 0)) {
                    Some(Ty::Struct(tag)) => Ty::Struct(tag),
                    Some(other) => {
                        Ty::Unknown(format!("struct {name}, but illumos's {name} is {other:?}"))
                    }
                    None => Ty::Struct(name.to_string()),
                };
            }
            Ty::Unknown(name.to_string())
        }
    }
}

/// Whether a Rust type has the shape of a C one: integers by width and
/// signedness (a C enum is an int-sized integer, either sign), the rest
/// exactly.
fn same_shape(rust: &Ty, c: &Ty) -> bool {
    match (rust, c) {
        (Ty::Int(r, rs), Ty::Int(c, cs)) => rank_bytes(*r) == rank_bytes(*c) && rs == cs,
        (Ty::Int(r, _), Ty::Enum(_)) => rank_bytes(*r) == 4,
        (Ty::Ptr(a), Ty::Ptr(b)) => same_shape(a, b),
        (Ty::Fn(ra, pa), Ty::Fn(rb, pb)) => {
            same_shape(ra, rb)
                && pa.len() == pb.len()
                && pa.iter().zip(pb).all(|(a, b)| same_shape(a, b))
        }
        (a, b) => a == b,
    }
}

#[test]
fn the_rust_mirrors_name_illumos_typedefs_with_their_shape() {
    let table = measured();
    let m = mirrors();
    let mut errors = Vec::new();
    let mut checked = 0;
    for (name, ty) in &m.aliases {
        let Some(real) = table.get(name) else {
            if name.ends_with("_t") && !RUST_OWN_T_NAMES.contains(&name.as_str()) {
                errors.push(format!(
                    "src/ffi/types.rs: {name} looks like an illumos typedef but is not one"
                ));
            }
            continue;
        };
        let ours = rust_type(ty, &m, &table, 0);
        let theirs = c_type(real, &table, 0);
        // A C function-type typedef (ddi_intr_handler_t) is used as a
        // parameter, which C adjusts to a pointer to the function type
        // (C11 6.7.6.3p8); Rust has no function types, only that pointer.
        let theirs_as_param = match &theirs {
            Ty::Fn(..) => Ty::Ptr(Box::new(theirs.clone())),
            t => t.clone(),
        };
        if !same_shape(&ours, &theirs_as_param) {
            errors.push(format!(
                "src/ffi/types.rs: type {name} = {ty} ({ours:?}); illumos declares `{real}` ({theirs:?})"
            ));
        }
        checked += 1;
    }
    for name in &m.structs {
        let Some(real) = table.get(name) else {
            if name.ends_with("_t") && !RUST_OWN_T_NAMES.contains(&name.as_str()) {
                errors.push(format!(
                    "src/ffi/types.rs: struct {name} looks like an illumos typedef but is not one"
                ));
            }
            continue;
        };
        // A struct named after a typedef stands for the struct the typedef
        // names; a typedef of a pointer (dev_info_t) cannot be a struct.
        match c_type(real, &table, 0) {
            Ty::Struct(_) => {}
            other => errors.push(format!(
                "src/ffi/types.rs: struct {name}, but illumos declares {name} as `{real}` \
                 ({other:?}): `*mut {name}` would not be `{name} *`"
            )),
        }
        checked += 1;
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 30, "checked only {checked} names");
}

/// Where the provided tables are: `RVSCSI_SHARED` (a `shared/` directory)
/// if set, else `shared/` beside the repository, where CI puts its copy.
fn shared_typedefs() -> std::path::PathBuf {
    let shared = std::env::var_os("RVSCSI_SHARED")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    shared.join("illumos-abi/illumos-typedefs.tsv")
}

#[test]
fn the_table_copy_is_the_measured_one() {
    // CI runs in a fresh clone with a copy of shared/ beside it, and the
    // developers' checkouts have it too: the copy here must not drift from
    // it. Without the tables this fails, unless told that they are absent
    // on purpose (RVSCSI_NO_SHARED=1), so that a CI that lost them cannot
    // pass unnoticed.
    let shared = shared_typedefs();
    match std::fs::read_to_string(&shared) {
        Ok(text) => {
            // The first line that differs, not the whole table.
            let first = text
                .lines()
                .zip(TSV.lines())
                .position(|(theirs, ours)| theirs != ours)
                .unwrap_or(text.lines().count().min(TSV.lines().count()));
            assert!(
                text == TSV,
                "test/abi/illumos-typedefs.tsv differs from {} from line {}: ours {:?}, theirs {:?}",
                shared.display(),
                first + 1,
                TSV.lines().nth(first),
                text.lines().nth(first)
            );
        }
        Err(_) if std::env::var_os("RVSCSI_NO_SHARED").is_some_and(|v| v == "1") => {
            eprintln!(
                "RVSCSI_NO_SHARED=1: {} not compared (only the copy in test/abi is checked)",
                shared.display()
            );
        }
        Err(e) => panic!(
            "{}: {e}: the measured typedefs are not at hand, so the copy in \
             test/abi/illumos-typedefs.tsv cannot be compared with them. Put the \
             provided shared/ beside the repository, or point RVSCSI_SHARED at it \
             (RVSCSI_SHARED=/path/to/shared), or set RVSCSI_NO_SHARED=1 to skip \
             this comparison on purpose",
            shared.display()
        ),
    }
}

/// A declarator with its name (`int (*tran_start)(...)`, `void
/// *ml_linkage[7]`, `kmutex_t tran_open_lock`) as (name, the abstract
/// type in the tables' spelling).
fn split_declarator(decl: &str) -> (String, String) {
    let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(at) = decl.find("(*") {
        let close = at + decl[at..].find(')').expect("(*NAME)");
        let name = decl[at + 2..close].trim().to_string();
        return (name, format!("{}(*){}", &decl[..at], &decl[close + 1..]));
    }
    let (base, array) = match decl.find('[') {
        Some(at) => (&decl[..at], &decl[at..]),
        None => (decl.as_str(), ""),
    };
    let start = base
        .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    let ty = base[..start].trim();
    let ty = match ty.strip_suffix('*') {
        Some(b) => format!("{} *", b.trim()),
        None => ty.to_string(),
    };
    (base[start..].to_string(), format!("{ty}{array}"))
}

/// A structure of the minimal declarations.
struct MinimalStruct {
    tag: String,
    /// Its typedef name, or empty.
    typedef_name: String,
    /// (name, type) of each member.
    members: Vec<(String, String)>,
}

/// The structures the minimal declarations define.
fn minimal_structs() -> Vec<MinimalStruct> {
    let code = c_code(MINIMAL);
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(open) = rest.find('{') {
        let head = rest[..open].trim_end();
        let head_words: Vec<&str> = head.split_whitespace().collect();
        let close = open + rest[open..].find('}').expect("a closed body");
        let body = &rest[open + 1..close];
        let after = &rest[close + 1..];
        let end = after.find(';').expect("the declaration ends");
        let typedef_name = after[..end].trim().to_string();
        rest = &after[end + 1..];
        let n = head_words.len();
        if n < 2 || head_words[n - 2] != "struct" {
            continue; // an enum
        }
        let tag = head_words[n - 1].to_string();
        let members = body
            .split(';')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(split_declarator)
            .collect();
        found.push(MinimalStruct {
            tag,
            typedef_name,
            members,
        });
    }
    found
}

/// The typedef names of the minimal declarations and of illumos, each side
/// resolved with its own.
fn both_sides() -> (HashMap<String, String>, HashMap<String, String>) {
    let own: HashMap<String, String> = c_typedefs(MINIMAL).into_iter().collect();
    (own, measured())
}

#[test]
fn every_member_of_the_minimal_structures_has_its_illumos_type() {
    let (own, table) = both_sides();
    let mut real: HashMap<(String, String), String> = HashMap::new();
    for line in FIELDS.lines().skip(1) {
        let c: Vec<&str> = line.split('\t').collect();
        if c.len() >= 7 {
            real.insert((c[0].to_string(), c[1].to_string()), c[6].to_string());
        }
    }
    let mut errors = Vec::new();
    let mut checked = 0;
    for MinimalStruct {
        tag,
        typedef_name,
        members,
    } in minimal_structs()
    {
        // The table names a structure by its tag, or by its typedef where
        // it has one (ddi_dma_attr_t).
        let key = if real.keys().any(|(s, _)| *s == typedef_name) {
            typedef_name
        } else {
            tag
        };
        for (member, ty) in members {
            let Some(theirs) = real.get(&(key.clone(), member.clone())) else {
                errors.push(format!("{key}.{member}: not in the measured fields"));
                continue;
            };
            let ours = c_type(&ty, &own, 0);
            let want = c_type(theirs, &table, 0);
            // A vector the shim never sets is declared as a generic
            // function pointer of the same size (see the header).
            let generic = ty == "rvscsi_unused_vector_t"
                && matches!(&want, Ty::Ptr(f) if matches!(**f, Ty::Fn(..)));
            if ours != want && !generic {
                errors.push(format!(
                    "{key}.{member} is `{ty}` ({ours:?}); illumos: `{theirs}` ({want:?})"
                ));
            }
            checked += 1;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 80, "checked only {checked} members");
}

#[test]
fn every_minimal_function_declaration_has_its_illumos_prototype() {
    let (own, table) = both_sides();
    let mut real: HashMap<String, (String, String)> = HashMap::new();
    for line in FUNCTIONS.lines().skip(1) {
        let c: Vec<&str> = line.split('\t').collect();
        if c.len() >= 3 {
            real.insert(c[0].to_string(), (c[1].to_string(), c[2].to_string()));
        }
    }
    let code = c_code(MINIMAL);
    let mut errors = Vec::new();
    let mut checked = 0;
    for decl in code.split(';') {
        let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
        let Some(d) = decl.strip_prefix("extern ") else {
            continue;
        };
        let Some(open) = d.find('(') else {
            continue; // data: mod_driverops
        };
        let (name, ret) = split_declarator(&d[..open]);
        let close = d.rfind(')').expect("a parameter list");
        let params: Vec<Ty> = split_top(&d[open + 1..close])
            .into_iter()
            .filter(|p| *p != "void")
            .map(|p| c_type(p, &own, 0))
            .collect();
        let Some((theirs_ret, theirs_params)) = real.get(&name) else {
            errors.push(format!("{name}: not a measured DDI function"));
            continue;
        };
        let want_params: Vec<Ty> = theirs_params
            .split(" ; ")
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "void")
            .map(|p| c_type(p, &table, 0))
            .collect();
        let (ours, want) = (c_type(&ret, &own, 0), c_type(theirs_ret, &table, 0));
        if ours != want || params != want_params {
            errors.push(format!(
                "{name}: `{d}`; illumos: {theirs_ret} ({theirs_params}) \
                 [{ours:?} {params:?} vs {want:?} {want_params:?}]"
            ));
        }
        checked += 1;
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 15, "checked only {checked} functions");
}
