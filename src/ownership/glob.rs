//! Topic patterns: exact names, or globs where `*` matches any run of characters (also none)
//! and `?` exactly one. Kafka topic names are ASCII (`[a-zA-Z0-9._-]`), so matching works on
//! bytes. No character classes and no escaping: topic names cannot contain `*`, `?` or `[`.

/// Whether `pattern` uses a wildcard; a pattern without one matches only the topic of that name.
pub(crate) fn is_glob(pattern: &str) -> bool {
    pattern.bytes().any(|b| b == b'*' || b == b'?')
}

/// The first byte of `pattern` that can appear neither in a Kafka topic name nor as a wildcard.
pub(crate) fn invalid_char(pattern: &str) -> Option<char> {
    pattern
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*' | '?')))
}

/// Whether `topic` matches the glob `pattern`.
///
/// Iterative with one backtrack point (the last `*` seen): linear for patterns with one star,
/// O(pattern × topic) at worst, and both are at most 249 bytes.
pub(crate) fn matches(pattern: &str, topic: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), topic.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where to resume after the last `*`: the pattern index after it, and the topic index it
    // has absorbed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi + 1, ti));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` absorb one more byte and retry from there.
                Some((after_star, absorbed)) => {
                    star = Some((after_star, absorbed + 1));
                    pi = after_star;
                    ti = absorbed + 1;
                }
                None => return false,
            },
        }
    }
    // The topic is used up: what is left of the pattern must be stars only.
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn literal_patterns_match_only_themselves() {
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders2"));
        assert!(!matches("orders", "order"));
        assert!(!matches("orders", ""));
    }

    #[test]
    fn star_matches_any_run_including_none() {
        assert!(matches("orders.*", "orders.eu"));
        assert!(matches("orders.*", "orders."));
        assert!(!matches("orders.*", "orders"));
        assert!(matches("*", ""));
        assert!(matches("*", "anything"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(matches("a*b*c", "abc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("*.dlq", "orders.retry.dlq"));
        assert!(matches("a*a", "aaa"));
        assert!(!matches("a*ab", "aaa"));
    }

    #[test]
    fn question_mark_matches_exactly_one() {
        assert!(matches("shard-?", "shard-1"));
        assert!(!matches("shard-?", "shard-"));
        assert!(!matches("shard-?", "shard-12"));
        assert!(matches("shard-??", "shard-12"));
    }

    #[test]
    fn wildcards_and_invalid_characters_are_recognised() {
        assert!(is_glob("a*"));
        assert!(is_glob("a?"));
        assert!(!is_glob("a.b_c-d"));
        assert_eq!(invalid_char("orders.eu-1_x*?"), None);
        assert_eq!(invalid_char("orders eu"), Some(' '));
        assert_eq!(invalid_char("orders/[eu]"), Some('/'));
    }

    /// A reference matcher: plain recursion, obviously right and exponential in the worst case.
    fn reference(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((&c, rest)) => {
                t.first().is_some_and(|&x| c == b'?' || c == x) && reference(rest, &t[1..])
            }
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference_matcher(p in "[ab.*?]{0,8}", t in "[ab.]{0,10}") {
            prop_assert_eq!(matches(&p, &t), reference(p.as_bytes(), t.as_bytes()));
        }
    }
}
