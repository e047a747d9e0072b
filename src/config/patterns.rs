//! Model name patterns: exact names and globs whose one wildcard, `*`, matches any run of
//! characters (`/` included). Matching is a hash lookup for exact names and a prefix, suffix
//! and in-order substring test per glob: no automaton per request.
//!
//! Invariant: a pattern holds no other glob syntax (`?`, `[...]`, `{a,b}`, `\`); the config
//! loader refuses them, so a pattern means exactly what it says.

use crate::maps::FastMap;

/// A set of patterns; a model matches when any one of them does.
#[derive(Debug, Clone, Default)]
pub struct ModelPatterns {
    exact: FastMap<Box<str>, ()>,
    globs: Vec<Glob>,
}

/// A pattern with at least one `*`, as the literal runs between its stars.
#[derive(Debug, Clone)]
struct Glob {
    /// `parts[0]` must start the name, the last part must end it, the others appear in
    /// between, in order, without overlapping.
    parts: Vec<Box<str>>,
}

impl ModelPatterns {
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = ModelPatterns::default();
        for pattern in patterns {
            if pattern.contains('*') {
                set.globs.push(Glob {
                    parts: pattern.split('*').map(Box::from).collect(),
                });
            } else {
                set.exact.insert(Box::from(pattern), ());
            }
        }
        set
    }

    pub fn is_match(&self, model: &str) -> bool {
        self.exact.contains_key(model) || self.globs.iter().any(|glob| glob.is_match(model))
    }
}

impl Glob {
    fn is_match(&self, name: &str) -> bool {
        let (Some((first, rest)), Some(last)) = (self.parts.split_first(), self.parts.last())
        else {
            return false;
        };
        // A glob has two parts at least (one star).
        let middle = rest.split_last().map_or(&[][..], |(_, middle)| middle);
        if name.len() < first.len() + last.len()
            || !name.starts_with(&**first)
            || !name.ends_with(&**last)
        {
            return false;
        }
        // Between the prefix and the suffix, each middle part at its leftmost place after the
        // previous one: if any placement works, the leftmost does.
        let mut between = &name[first.len()..name.len() - last.len()];
        for part in middle {
            match between.find(&**part) {
                Some(at) => between = &between[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(patterns: &[&str]) -> ModelPatterns {
        ModelPatterns::new(patterns.iter().copied())
    }

    #[test]
    fn exact_names_and_star_globs() {
        let allowed = set(&["gpt-4o-mini", "gpt-4.1*", "*-embedding-*", "o*-mini", "*"]);
        assert!(allowed.is_match("gpt-4o-mini"));
        assert!(allowed.is_match("gpt-4.1"));
        assert!(allowed.is_match("gpt-4.1-nano"));
        assert!(allowed.is_match("text-embedding-3-small"));
        assert!(allowed.is_match("o4-mini"));
        assert!(allowed.is_match("anything/at all"));
        let narrow = set(&["gpt-4o-mini", "gpt-4.1*", "*-embedding-*", "o*-mini"]);
        assert!(!narrow.is_match("gpt-4o"));
        assert!(!narrow.is_match("gpt-4o-mini-2024-07-18"));
        assert!(!narrow.is_match("text-embedding"));
        assert!(!narrow.is_match("o-min"));
        assert!(narrow.is_match("o-mini"));
        assert!(set(&["a*a"]).is_match("aa"));
        assert!(
            !set(&["a*a"]).is_match("a"),
            "prefix and suffix may not overlap"
        );
        assert!(set(&["ft:*:org*"]).is_match("ft:gpt-4o:org-x:abc"));
        assert!(!set(&[]).is_match(""));
    }

    /// The globset crate, configured as the loader used to (`*` crosses `/`), as the oracle:
    /// each glob's own matcher (its regex). Not a `GlobSet`, whose shortcut for `*.ext` globs
    /// compares file extensions and so says `*.` does not match `..`.
    fn oracle(patterns: &[String], name: &str) -> bool {
        patterns.iter().any(|pattern| {
            globset::GlobBuilder::new(pattern)
                .literal_separator(false)
                .build()
                .unwrap()
                .compile_matcher()
                .is_match(name)
        })
    }

    proptest! {
        #[test]
        fn matches_as_globset_does(
            patterns in proptest::collection::vec("[ab*/.-]{0,6}", 1..4),
            name in "[ab/.-]{0,8}",
        ) {
            // globset reads `**` specially next to `/`; the loader's patterns are compared on
            // what both define the same way.
            prop_assume!(patterns.iter().all(|p| !p.is_empty() && !p.contains("**")));
            let ours = ModelPatterns::new(patterns.iter().map(String::as_str));
            prop_assert_eq!(ours.is_match(&name), oracle(&patterns, &name));
        }
    }
}
