//! HTML to text: the main content of a page, without navigation, sidebars, footers, forms and
//! scripts, one block (paragraph, heading, list item, table row, code block) per line.
//!
//! The page is parsed by html5ever (through `scraper`) and walked iteratively, so deeply nested
//! hostile markup cannot overflow the stack.

use ego_tree::iter::Edge;
use scraper::{Html, Node};

use pretrain_crd::spec::Extract;

/// The text of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The `<title>`, whitespace-collapsed.
    pub title: Option<String>,
    /// Main-content text, one block per line.
    pub text: String,
}

/// Elements whose content is never text of the page.
fn always_skipped(name: &str) -> bool {
    matches!(
        name,
        "head"
            | "script"
            | "style"
            | "noscript"
            | "template"
            | "svg"
            | "math"
            | "iframe"
            | "object"
            | "embed"
            | "canvas"
            | "nav"
            | "aside"
            | "footer"
            | "header"
            | "form"
            | "button"
            | "select"
            | "option"
            | "textarea"
            | "input"
            | "label"
            | "dialog"
            | "menu"
    )
}

/// Words in a class or id that mark boilerplate containers.
const BOILERPLATE: &[&str] = &[
    "nav",
    "navbar",
    "navigation",
    "menu",
    "menubar",
    "sidebar",
    "footer",
    "breadcrumb",
    "breadcrumbs",
    "cookie",
    "cookies",
    "consent",
    "banner",
    "share",
    "sharing",
    "social",
    "related",
    "advert",
    "ads",
    "advertisement",
    "promo",
    "subscribe",
    "newsletter",
    "pagination",
    "pager",
    "search",
    "skip",
    "popup",
    "modal",
    "comments",
    "toolbar",
];

/// Elements that end a line of text.
fn is_block(name: &str) -> bool {
    matches!(
        name,
        "p" | "div"
            | "br"
            | "hr"
            | "li"
            | "ul"
            | "ol"
            | "dl"
            | "dt"
            | "dd"
            | "h1"
            | "h2"
            | "h3"
            | "h4"
            | "h5"
            | "h6"
            | "pre"
            | "blockquote"
            | "section"
            | "article"
            | "main"
            | "table"
            | "tr"
            | "td"
            | "th"
            | "caption"
            | "figcaption"
            | "figure"
            | "details"
            | "summary"
            | "address"
            | "body"
    )
}

fn is_boilerplate(element: &scraper::node::Element) -> bool {
    let marked = |value: Option<&str>| {
        value.is_some_and(|v| {
            v.split(|c: char| c.is_whitespace() || c == '-' || c == '_')
                .any(|word| BOILERPLATE.iter().any(|b| word.eq_ignore_ascii_case(b)))
        })
    };
    marked(element.attr("class"))
        || marked(element.attr("id"))
        || element
            .attr("role")
            .is_some_and(|r| matches!(r, "navigation" | "banner" | "contentinfo" | "complementary" | "search" | "menu"))
        || element.attr("aria-hidden") == Some("true")
        || element.attr("hidden").is_some()
}

fn skipped(element: &scraper::node::Element, options: &Extract) -> bool {
    let name = element.name();
    always_skipped(name)
        || (!options.include_tables && name == "table")
        || (!options.include_code && (name == "pre" || name == "code"))
        || (options.main_content_only && is_boilerplate(element))
}

/// Deepest element nesting a page may have. html5ever's tree builder does work proportional to the
/// depth for every tag, so hostile pages nested 100,000 deep would take minutes; real pages stay far
/// below this.
pub const MAX_NESTING: usize = 1024;

/// Elements that never hold content, or are routinely left unclosed, so they do not nest.
const NON_NESTING: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr", "p",
    "li", "td", "th", "tr", "dt", "dd", "option", "!doctype",
];

/// Whether the page nests elements deeper than `MAX_NESTING`, by a cheap scan of its tags.
fn too_deep(html: &str) -> bool {
    let bytes = html.as_bytes();
    let mut depth = 0usize;
    for i in memchr::memchr_iter(b'<', bytes) {
        let rest = &bytes[i + 1..];
        let closing = rest.first() == Some(&b'/');
        let name_start = usize::from(closing);
        let name_len = rest[name_start..].iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'!').count();
        if name_len == 0 {
            continue;
        }
        let name = &rest[name_start..name_start + name_len];
        if NON_NESTING.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(name)) {
            continue;
        }
        if closing {
            depth = depth.saturating_sub(1);
        } else {
            let self_closing = memchr::memchr(b'>', rest).is_some_and(|end| end > 0 && rest[end - 1] == b'/');
            if !self_closing {
                depth += 1;
                if depth > MAX_NESTING {
                    return true;
                }
            }
        }
    }
    false
}

/// Extracts the title and main-content text of an HTML page; refuses pages nested deeper than
/// `MAX_NESTING`.
pub fn extract(html: &str, options: &Extract) -> Result<Page, String> {
    if too_deep(html) {
        return Err(format!("HTML nested deeper than {MAX_NESTING} elements"));
    }
    let document = Html::parse_document(html);
    let title = document
        .tree
        .root()
        .descendants()
        .find(|n| n.value().as_element().is_some_and(|e| e.name() == "title"))
        .map(|n| collapse(&n.descendants().filter_map(|d| d.value().as_text().map(|t| &**t)).collect::<String>()))
        .filter(|t| !t.is_empty());

    // The main element, when the page marks one; else the whole body.
    let main = options
        .main_content_only
        .then(|| {
            document.tree.root().descendants().find(|n| {
                n.value()
                    .as_element()
                    .is_some_and(|e| e.name() == "main" || e.name() == "article" || e.attr("role") == Some("main"))
            })
        })
        .flatten();
    let root = main.unwrap_or_else(|| document.tree.root());

    let mut out = String::with_capacity(html.len() / 4);
    let mut skip_until = None;
    let mut pre_depth = 0usize;
    for edge in root.traverse() {
        match edge {
            Edge::Open(node) => {
                if skip_until.is_some() {
                    continue;
                }
                match node.value() {
                    Node::Element(e) => {
                        if node.id() != root.id() && skipped(e, options) {
                            skip_until = Some(node.id());
                            continue;
                        }
                        if e.name() == "pre" {
                            pre_depth += 1;
                        }
                        if is_block(e.name()) {
                            out.push('\n');
                        }
                    }
                    Node::Text(t) => {
                        if pre_depth > 0 {
                            out.push_str(t);
                        } else {
                            push_collapsed(&mut out, t);
                        }
                    }
                    _ => {}
                }
            }
            Edge::Close(node) => {
                if let Some(id) = skip_until {
                    if id == node.id() {
                        skip_until = None;
                    }
                    continue;
                }
                if let Node::Element(e) = node.value() {
                    if e.name() == "pre" {
                        pre_depth = pre_depth.saturating_sub(1);
                    }
                    if is_block(e.name()) {
                        out.push('\n');
                    }
                }
            }
        }
    }
    Ok(Page { title, text: tidy(&out) })
}

/// Appends text with runs of whitespace collapsed to one space.
fn push_collapsed(out: &mut String, text: &str) {
    let mut space = out.ends_with([' ', '\n']);
    for c in text.chars() {
        if c.is_whitespace() {
            if !space {
                out.push(' ');
                space = true;
            }
        } else {
            out.push(c);
            space = false;
        }
    }
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Trims each line and drops empty ones.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.trim_end();
        let line = if line.trim_start().is_empty() { "" } else { line };
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        // Indentation matters only in code; prose lines are trimmed on both sides.
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(html: &str) -> Page {
        extract(html, &Extract::default()).unwrap()
    }

    #[test]
    fn keeps_main_content_and_drops_boilerplate() {
        let p = page(
            r#"<html><head><title> The  Book </title><style>p{}</style></head><body>
            <nav class="sidebar"><a href="/">Home</a> <a href="/x">Chapter 1</a></nav>
            <div id="menu-bar">Search this book</div>
            <main><h1>Ownership</h1><p>Ownership is a set of rules &amp; checks.</p>
            <script>var x = 1;</script><ul><li>Each value has an owner.</li><li>One owner at a time.</li></ul>
            <div class="cookie-banner">We use cookies</div></main>
            <footer>Copyright 2026</footer></body></html>"#,
        );
        assert_eq!(p.title.as_deref(), Some("The Book"));
        assert_eq!(
            p.text,
            "Ownership\nOwnership is a set of rules & checks.\nEach value has an owner.\nOne owner at a time."
        );
    }

    #[test]
    fn without_a_main_element_takes_the_body_minus_boilerplate() {
        let p = page(
            "<body><header>Site</header><div><p>First  paragraph\n here.</p><p>Second.</p></div><aside>Ad</aside></body>",
        );
        assert_eq!(p.text, "First paragraph here.\nSecond.");
    }

    #[test]
    fn keeps_code_blocks_verbatim_unless_asked_not_to() {
        let html = "<main><p>Example:</p><pre><code>fn main() {\n    println!(\"hi\");\n}</code></pre></main>";
        assert_eq!(page(html).text, "Example:\nfn main() {\n    println!(\"hi\");\n}");
        let no_code = extract(html, &Extract { include_code: false, ..Extract::default() }).unwrap();
        assert_eq!(no_code.text, "Example:");
    }

    #[test]
    fn refuses_hostile_nesting_and_accepts_deep_real_pages() {
        let hostile = format!("<body>{}deep{}</body>", "<div>".repeat(100_000), "</div>".repeat(100_000));
        assert_eq!(extract(&hostile, &Extract::default()), Err("HTML nested deeper than 1024 elements".into()));
        let deep = format!("<body>{}deep{}</body>", "<div>".repeat(500), "</div>".repeat(500));
        assert_eq!(page(&deep).text, "deep");
        let many_paragraphs = format!("<body>{}</body>", "<p>unclosed paragraph<br>".repeat(5000));
        assert!(extract(&many_paragraphs, &Extract::default()).is_ok());
    }
}
