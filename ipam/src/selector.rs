//! Calico label selectors (the `nodeSelector` of an IPPool): parser with positioned errors, and evaluator.
//!
//! Grammar (whitespace between tokens is free):
//! ```text
//! expr    := and ( "||" and )*
//! and     := unary ( "&&" unary )*
//! unary   := "!" unary | primary
//! primary := "(" expr ")" | "all()" | "global()" | "has(" key ")"
//!          | key ( "==" str | "!=" str | "in" set | "not" "in" set
//!                | "contains" str | "starts" "with" str | "ends" "with" str )
//! set     := "{" [ str ( "," str )* ] "}"
//! str     := '…' | "…"
//! key     := [A-Za-z0-9_./-]+
//! ```
//! An empty (or all-whitespace) selector means `all()`, as in Calico.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    source: String,
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    All,
    Has(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// Why a selector did not parse: the byte offset, what the parser expected there and what it found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {source_text:?}: at position {position}: expected {expected}, found {found}")]
pub struct SelectorError {
    /// The selector text.
    pub source_text: String,
    /// Byte offset of the problem.
    pub position: usize,
    /// What would have been accepted there.
    pub expected: String,
    /// What was there (`end of input` at the end).
    pub found: String,
}

impl Selector {
    /// Parses Calico selector syntax.
    pub fn parse(source: &str) -> Result<Self, SelectorError> {
        let mut parser = Parser {
            src: source,
            pos: 0,
        };
        parser.skip_ws();
        if parser.at_end() {
            return Ok(Self {
                source: source.to_string(),
                expr: Expr::All,
            });
        }
        let expr = parser.or_expr()?;
        parser.skip_ws();
        if !parser.at_end() {
            return Err(parser.error("'&&', '||' or end of input"));
        }
        Ok(Self {
            source: source.to_string(),
            expr,
        })
    }

    /// The selector that matches everything, `all()`.
    pub fn all() -> Self {
        Self {
            source: "all()".to_string(),
            expr: Expr::All,
        }
    }

    /// The text this selector was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether a label set matches.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        eval(&self.expr, labels)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn eval(expr: &Expr, labels: &BTreeMap<String, String>) -> bool {
    match expr {
        Expr::All => true,
        Expr::Has(k) => labels.contains_key(k),
        Expr::Eq(k, v) => labels.get(k) == Some(v),
        // Calico: `k != 'v'` is true when the label is absent.
        Expr::NotEq(k, v) => labels.get(k) != Some(v),
        Expr::In(k, set) => labels.get(k).is_some_and(|v| set.contains(v)),
        Expr::NotIn(k, set) => !labels.get(k).is_some_and(|v| set.contains(v)),
        Expr::Contains(k, s) => labels.get(k).is_some_and(|v| v.contains(s.as_str())),
        Expr::StartsWith(k, s) => labels.get(k).is_some_and(|v| v.starts_with(s.as_str())),
        Expr::EndsWith(k, s) => labels.get(k).is_some_and(|v| v.ends_with(s.as_str())),
        Expr::Not(e) => !eval(e, labels),
        Expr::And(a, b) => eval(a, labels) && eval(b, labels),
        Expr::Or(a, b) => eval(a, labels) || eval(b, labels),
    }
}

/// Nesting bound so a hostile selector cannot overflow the stack.
const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn rest(&self) -> &str {
        &self.src[self.pos..]
    }

    fn skip_ws(&mut self) {
        while let Some(b) = self.src.as_bytes().get(self.pos) {
            if b.is_ascii_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn found(&self) -> String {
        match self.rest().chars().next() {
            None => "end of input".to_string(),
            Some(_) => {
                let snippet: String = self.rest().chars().take(12).collect();
                format!("{snippet:?}")
            }
        }
    }

    fn error(&self, expected: &str) -> SelectorError {
        SelectorError {
            source_text: self.src.to_string(),
            position: self.pos,
            expected: expected.to_string(),
            found: self.found(),
        }
    }

    /// Consumes `token` (after whitespace) if present.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// Consumes a keyword only when it is not the prefix of a longer key.
    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_ws();
        let rest = self.rest().as_bytes();
        if rest.starts_with(word.as_bytes())
            && !rest.get(word.len()).copied().is_some_and(is_key_byte)
        {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str, expected: &str) -> Result<(), SelectorError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn or_expr(&mut self) -> Result<Expr, SelectorError> {
        self.or_expr_at(0)
    }

    fn or_expr_at(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        let mut left = self.and_expr(depth)?;
        while self.eat("||") {
            let right = self.and_expr(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expr(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        let mut left = self.unary(depth)?;
        while self.eat("&&") {
            let right = self.unary(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        if depth > MAX_DEPTH {
            return Err(self.error("less nesting (at most 64 levels)"));
        }
        self.skip_ws();
        // `!=` never starts an expression, so a leading `!` is always negation.
        if self.eat("!") {
            let inner = self.unary(depth + 1)?;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.primary(depth)
    }

    fn primary(&mut self, depth: usize) -> Result<Expr, SelectorError> {
        if self.eat("(") {
            let inner = self.or_expr_at(depth + 1)?;
            self.expect(")", "')'")?;
            return Ok(inner);
        }
        let checkpoint = self.pos;
        if self.eat_word("all") || self.eat_word("global") {
            if self.eat("(") {
                self.expect(")", "')' closing all()")?;
                return Ok(Expr::All);
            }
            // A label actually named `all`/`global`.
            self.pos = checkpoint;
        }
        if self.eat_word("has") {
            if self.eat("(") {
                self.skip_ws();
                let key = self.key()?;
                self.expect(")", "')' closing has(")?;
                return Ok(Expr::Has(key));
            }
            self.pos = checkpoint;
        }
        self.skip_ws();
        let key = match self.key() {
            Ok(key) => key,
            Err(_) => {
                return Err(self.error("a label name, '!', '(', 'all()' or 'has('"));
            }
        };
        self.comparison(key)
    }

    fn comparison(&mut self, key: String) -> Result<Expr, SelectorError> {
        if self.eat("==") {
            return Ok(Expr::Eq(key, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Expr::NotEq(key, self.string()?));
        }
        if self.eat_word("in") {
            return Ok(Expr::In(key, self.set()?));
        }
        if self.eat_word("not") {
            if !self.eat_word("in") {
                return Err(self.error("'in' after 'not'"));
            }
            return Ok(Expr::NotIn(key, self.set()?));
        }
        if self.eat_word("contains") {
            return Ok(Expr::Contains(key, self.string()?));
        }
        if self.eat_word("starts") {
            if !self.eat_word("with") {
                return Err(self.error("'with' after 'starts'"));
            }
            return Ok(Expr::StartsWith(key, self.string()?));
        }
        if self.eat_word("ends") {
            if !self.eat_word("with") {
                return Err(self.error("'with' after 'ends'"));
            }
            return Ok(Expr::EndsWith(key, self.string()?));
        }
        Err(self.error(
            "an operator after the label name ('==', '!=', 'in', 'not in', 'contains', 'starts with', 'ends with')",
        ))
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        let start = self.pos;
        while self
            .src
            .as_bytes()
            .get(self.pos)
            .copied()
            .is_some_and(is_key_byte)
        {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("a label name"));
        }
        Ok(self.src[start..self.pos].to_string())
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.rest().as_bytes().first() {
            Some(q @ (b'\'' | b'"')) => *q,
            _ => return Err(self.error("a quoted string ('…' or \"…\")")),
        };
        let start = self.pos;
        let body_start = self.pos + 1;
        // Quotes are ASCII, so a byte search cannot split a UTF-8 sequence.
        match self.src.as_bytes()[body_start..]
            .iter()
            .position(|b| *b == quote)
        {
            Some(len) => {
                self.pos = body_start + len + 1;
                Ok(self.src[body_start..body_start + len].to_string())
            }
            None => {
                self.pos = start;
                Err(SelectorError {
                    source_text: self.src.to_string(),
                    position: start,
                    expected: "a closing quote for this string".to_string(),
                    found: "end of input".to_string(),
                })
            }
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        self.expect("{", "'{' opening a set")?;
        let mut values = BTreeSet::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
            values.insert(self.string()?);
            if self.eat("}") {
                return Ok(values);
            }
            self.expect(",", "',' or '}' in a set")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn matches(sel: &str, pairs: &[(&str, &str)]) -> bool {
        Selector::parse(sel).unwrap().matches(&labels(pairs))
    }

    #[test]
    fn empty_and_all_match_everything() {
        assert!(matches("", &[]));
        assert!(matches("  ", &[("a", "b")]));
        assert!(matches("all()", &[]));
        assert!(matches(" all ( ) ", &[]));
    }

    #[test]
    fn equality_and_inequality() {
        assert!(matches("zone == 'a'", &[("zone", "a")]));
        assert!(!matches("zone == 'a'", &[("zone", "b")]));
        assert!(!matches("zone == 'a'", &[]));
        assert!(matches("zone != 'a'", &[]), "absent label is != any value");
        assert!(!matches("zone != \"a\"", &[("zone", "a")]));
    }

    #[test]
    fn has_in_not_in() {
        assert!(matches(
            "has(kubernetes.io/hostname)",
            &[("kubernetes.io/hostname", "n1")]
        ));
        assert!(!matches("has(x)", &[("y", "1")]));
        assert!(matches("rack in {'r1', \"r2\"}", &[("rack", "r2")]));
        assert!(!matches("rack in {'r1','r2'}", &[("rack", "r3")]));
        assert!(!matches("rack in {}", &[("rack", "r3")]));
        assert!(matches("rack not in {'r1'}", &[]));
        assert!(!matches("rack not in {'r1'}", &[("rack", "r1")]));
    }

    #[test]
    fn string_operators() {
        assert!(matches("n contains 'ode'", &[("n", "node1")]));
        assert!(matches("n starts with 'no'", &[("n", "node1")]));
        assert!(matches("n ends with '1'", &[("n", "node1")]));
        assert!(!matches("n ends with '2'", &[("n", "node1")]));
    }

    #[test]
    fn precedence_and_parentheses() {
        // && binds tighter than ||
        assert!(matches("a == '1' || b == '1' && c == '1'", &[("a", "1")]));
        assert!(!matches(
            "(a == '1' || b == '1') && c == '1'",
            &[("a", "1")]
        ));
        assert!(matches("!has(a) && !(b == '2')", &[("b", "1")]));
        assert!(matches("!!has(a)", &[("a", "")]));
    }

    #[test]
    fn label_named_like_keyword_still_parses() {
        assert!(matches("all == 'x'", &[("all", "x")]));
        assert!(matches("has == 'x'", &[("has", "x")]));
        assert!(matches("inside in {'x'}", &[("inside", "x")]));
    }

    #[test]
    fn errors_report_position_and_expectation() {
        let err = Selector::parse("zone = 'a'").unwrap_err();
        assert_eq!(err.position, 5);
        assert!(err.expected.contains("'=='"), "{err}");

        let err = Selector::parse("zone == a").unwrap_err();
        assert_eq!(err.position, 8);
        assert!(err.expected.contains("quoted string"), "{err}");

        let err = Selector::parse("zone == 'a").unwrap_err();
        assert_eq!(err.position, 8);
        assert!(err.expected.contains("closing quote"), "{err}");

        let err = Selector::parse("(has(a)").unwrap_err();
        assert_eq!(err.position, 7);
        assert_eq!(err.found, "end of input");

        let err = Selector::parse("has(a) has(b)").unwrap_err();
        assert_eq!(err.position, 7);
        assert!(err.expected.contains("&&"), "{err}");

        let err = Selector::parse("a in {'x' 'y'}").unwrap_err();
        assert_eq!(err.position, 10);

        let err = Selector::parse("a not {'x'}").unwrap_err();
        assert!(err.expected.contains("'in'"), "{err}");

        let err = Selector::parse("&& a == 'b'").unwrap_err();
        assert_eq!(err.position, 0);
    }

    #[test]
    fn deep_nesting_is_rejected_not_overflowed() {
        let deep = format!("{}all(){}", "(".repeat(1000), ")".repeat(1000));
        assert!(Selector::parse(&deep).is_err());
        let bangs = format!("{}all()", "!".repeat(1000));
        assert!(Selector::parse(&bangs).is_err());
    }
}
