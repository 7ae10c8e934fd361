//! The documentation agrees with the code and with itself: the README stays short and its
//! exit-code table is `exit::TABLE`, `--help` is built from that table, and every relative link
//! in the README and docs/ leads to a file and, with `#anchor`, to one of its headings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use lease_exec::exit::TABLE;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_lease-exec");

/// The README's limit: what it is, the promise, how to start, and links to the rest.
const README_MAX_BYTES: u64 = 12 * 1024;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Words only: no backticks, no case, one space between words.
fn words(text: &str) -> String {
    text.replace('`', "")
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_readme_is_at_most_12_kib() {
    let size = std::fs::metadata(Path::new(ROOT).join("README.md"))
        .unwrap()
        .len();
    assert!(
        size <= README_MAX_BYTES,
        "README.md is {size} bytes, over {README_MAX_BYTES}: move detail to a page in docs/"
    );
}

/// The rows of the markdown table in the README's section `## Exit codes`: (code, meaning).
fn readme_exit_codes() -> Vec<(String, String)> {
    let readme = read(&Path::new(ROOT).join("README.md"));
    let section = readme
        .split("\n## Exit codes\n")
        .nth(1)
        .expect("a section ## Exit codes")
        .split("\n## ")
        .next()
        .unwrap();
    let mut rows = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter(|l| !l.chars().all(|c| "|-: ".contains(c)))
        .map(|l| {
            let cells: Vec<&str> = l.trim().trim_matches('|').split(" | ").collect();
            assert_eq!(cells.len(), 2, "not a two-column row: {l}");
            (cells[0].trim().to_string(), cells[1].trim().to_string())
        });
    let header = rows.next().expect("a table");
    assert_eq!(header, ("code".to_string(), "meaning".to_string()));
    rows.collect()
}

#[test]
fn the_readme_exit_code_table_is_the_codes_table() {
    let readme = readme_exit_codes();
    let code: Vec<(String, String)> = TABLE
        .iter()
        .map(|row| (row.code.label(), row.meaning.to_string()))
        .collect();
    assert_eq!(
        readme.iter().map(|(c, _)| c).collect::<Vec<_>>(),
        code.iter().map(|(c, _)| c).collect::<Vec<_>>(),
        "the README's exit codes differ from exit::TABLE's"
    );
    for ((label, meaning), (_, readme_meaning)) in code.iter().zip(&readme) {
        assert_eq!(
            words(readme_meaning),
            words(meaning),
            "exit code {label}: the README says otherwise than exit::TABLE"
        );
    }
}

#[test]
fn help_lists_every_exit_code_of_the_table() {
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let section = help
        .split("\nExit status:\n")
        .nth(1)
        .expect("--help has an Exit status section");
    let section = section.split("\n\n").next().unwrap();
    let listed = words(section);
    for row in TABLE {
        let line = words(&format!("{} {}", row.code.label(), row.meaning));
        assert!(
            listed.contains(&line),
            "--help's exit status lacks: {line}\n{section}"
        );
    }
    // Nothing more than the table: every line is a label or a meaning of it.
    let labels: BTreeSet<String> = TABLE.iter().map(|row| row.code.label()).collect();
    let rows = section
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .map(|l| l.trim().to_string())
        .collect::<BTreeSet<_>>();
    assert_eq!(rows, labels, "--help's exit codes are not exit::TABLE's");
}

/// The markdown pages whose links are checked.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut pages = vec![root.join("README.md"), root.join("testenv/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The page without its fenced code blocks.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// GitHub's anchors of a page's headings: lowercase, punctuation dropped, spaces to hyphens, and
/// `-1`, `-2`, ... after a repeated one.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in prose(text).lines() {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let anchor: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let count = seen.entry(anchor.clone()).or_default();
        anchors.insert(match *count {
            0 => anchor,
            n => format!("{anchor}-{n}"),
        });
        *count += 1;
    }
    anchors
}

/// The targets of a page's inline links `[text](target)` outside code, but not `http(s)://` ones.
fn relative_links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut links = Vec::new();
    for line in prose.lines() {
        // Code spans hold no links.
        let outside: String = line
            .split('`')
            .enumerate()
            .map(|(i, part)| if i % 2 == 0 { part } else { "" })
            .collect();
        for (i, _) in outside.match_indices("](") {
            let rest = &outside[i + 2..];
            let target = &rest[..rest.find(')').expect("a link's closing parenthesis")];
            if !target.starts_with("http://") && !target.starts_with("https://") {
                links.push(target.to_string());
            }
        }
    }
    links
}

/// What is wrong with each relative link of `page`, if anything.
fn broken_links(page: &Path) -> Vec<String> {
    let text = read(page);
    let mut broken = Vec::new();
    for target in relative_links(&text) {
        let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
        let file = if path.is_empty() {
            page.to_path_buf()
        } else {
            page.parent().unwrap().join(path)
        };
        if !file.exists() {
            broken.push(format!("{target}: no file {}", file.display()));
        } else if !fragment.is_empty() {
            if file.extension().is_none_or(|e| e != "md") {
                broken.push(format!(
                    "{target}: an anchor in a file that is not markdown"
                ));
            } else if !anchors(&read(&file)).contains(fragment) {
                broken.push(format!("{target}: no heading for #{fragment}"));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut checked = 0;
    let mut broken = Vec::new();
    for page in pages() {
        checked += relative_links(&read(&page)).len();
        broken.extend(
            broken_links(&page)
                .into_iter()
                .map(|b| format!("{}: {b}", page.display())),
        );
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 20, "only {checked} relative links found");
}

#[test]
fn the_link_checker_finds_broken_links() {
    let dir = std::env::temp_dir().join(format!("lease-exec-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("other.md"), "# Other page\n\n## A section, here\n").unwrap();
    let page = dir.join("page.md");
    std::fs::write(
        &page,
        "# Page\n\n[ok](other.md#a-section-here) [ok](#page) [ok](other.md) `[code](nowhere.md)`\n\
         [missing](nowhere.md) [no heading](other.md#elsewhere) [no local heading](#elsewhere)\n\
         ```\n[in a code block](nowhere.md)\n```\n",
    )
    .unwrap();
    let broken = broken_links(&page);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(broken[0].starts_with("nowhere.md: no file"), "{broken:#?}");
    assert!(broken[1].starts_with("other.md#elsewhere: no heading"));
    assert!(broken[2].starts_with("#elsewhere: no heading"));
}

#[test]
fn every_page_in_docs_is_linked_from_the_readme() {
    let readme = read(&Path::new(ROOT).join("README.md"));
    let linked: BTreeSet<String> = relative_links(&readme)
        .into_iter()
        .map(|l| l.split('#').next().unwrap().to_string())
        .collect();
    for page in pages()
        .into_iter()
        .filter(|p| p.parent().unwrap().ends_with("docs"))
    {
        let name = format!("docs/{}", page.file_name().unwrap().to_string_lossy());
        assert!(linked.contains(&name), "the README does not link {name}");
    }
}
