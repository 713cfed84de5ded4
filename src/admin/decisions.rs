//! Records decided per rule, for the ownership map's rates (`GET /decisions`): read from the
//! counters `/metrics` exports (`keyward_produce_records_total`), summed over owners and
//! reasons. Reading the exporter's own text keeps one set of counters: the data path counts
//! each decision once, with handles created once, and knows nothing of the page.

use serde_json::{Map, Value};

/// The decisions a rule's row shows, in the page's order.
pub const DECISIONS: [&str; 5] = ["forwarded", "redirected", "rejected", "held", "audited"];

const RECORDS: &str = "keyward_produce_records_total";

/// `[{"rule": "orders", "forwarded": 3, "redirected": 0, "rejected": 2, "held": 0,
/// "audited": 0}, ...]`: one entry per name of `rules`, in their order, then `"-"` (writes no
/// rule matched), each with every decision of [`DECISIONS`], 0 when never counted. Counts of
/// rules no longer in the table are left out.
pub fn per_rule(prometheus_text: &str, rules: &[&str]) -> Value {
    let mut rows: Vec<(&str, [u64; DECISIONS.len()])> = rules
        .iter()
        .copied()
        .chain(std::iter::once("-"))
        .map(|rule| (rule, [0; DECISIONS.len()]))
        .collect();
    for (labels, value) in prometheus_text.lines().filter_map(|l| sample(RECORDS, l)) {
        let (mut rule, mut decision) = (None, None);
        for (name, value) in labels {
            match name {
                "rule" => rule = Some(value),
                "decision" => decision = Some(value),
                _ => {}
            }
        }
        let column = decision.and_then(|d| DECISIONS.iter().position(|&c| c == d));
        let row = rule.and_then(|r| rows.iter_mut().find(|(name, _)| *name == r));
        if let (Some(column), Some((_, counts))) = (column, row) {
            counts[column] = counts[column].saturating_add(value);
        }
    }
    rows.into_iter()
        .map(|(rule, counts)| {
            let mut row = Map::new();
            row.insert("rule".into(), rule.into());
            for (decision, count) in DECISIONS.iter().zip(counts) {
                row.insert((*decision).into(), count.into());
            }
            Value::Object(row)
        })
        .collect()
}

/// A sample's labels, values unescaped.
type Labels<'a> = Vec<(&'a str, String)>;

/// One line of Prometheus text, if it is a sample of `metric`: its labels and its value, a
/// counter's whole number.
fn sample<'a>(metric: &str, line: &'a str) -> Option<(Labels<'a>, u64)> {
    let rest = line.strip_prefix(metric)?;
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(rest) => labels(rest)?,
        None => (Vec::new(), rest),
    };
    let value = rest.strip_prefix(' ')?.split(' ').next()?;
    let value: f64 = value.parse().ok()?;
    // Counters are whole and not negative; `as` saturates anything else.
    Some((labels, value as u64))
}

/// `name="value",...}` and what follows the `}`; values with `\\`, `\"` and `\n` unescaped.
fn labels(mut rest: &str) -> Option<(Labels<'_>, &str)> {
    let mut labels = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name, value));
        rest = after.get(end + 1..)?;
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_are_summed_per_rule_and_decision_from_the_exported_counters() {
        let text = r#"# TYPE keyward_produce_records_total counter
keyward_produce_records_total{rule="orders",owner="eu",decision="forwarded",reason="-"} 3
keyward_produce_records_total{rule="orders",owner="us",decision="rejected",reason="foreign_owner"} 2
keyward_produce_records_total{rule="orders",owner="-",decision="rejected",reason="null_key"} 1
keyward_produce_records_total{rule="orders",owner="us",decision="redirected",reason="split"} 4
keyward_produce_records_total{rule="a \"quoted\\ name",owner="us",decision="held",reason="frozen"} 5
keyward_produce_records_total{rule="-",owner="-",decision="audited",reason="-"} 6
keyward_produce_records_total{rule="gone",owner="eu",decision="forwarded",reason="-"} 7
keyward_produce_batches_total{rule="orders",owner="eu",decision="forwarded",reason="-"} 100
keyward_produce_records_total_extra{rule="orders",owner="eu",decision="forwarded",reason="-"} 100
"#;
        let zero = |rule: &str| json!({"rule": rule, "forwarded": 0, "redirected": 0, "rejected": 0, "held": 0, "audited": 0});
        let mut orders = zero("orders");
        orders["forwarded"] = 3.into();
        orders["rejected"] = 3.into();
        orders["redirected"] = 4.into();
        let mut quoted = zero("a \"quoted\\ name");
        quoted["held"] = 5.into();
        let mut none = zero("-");
        none["audited"] = 6.into();
        assert_eq!(
            per_rule(text, &["orders", "tenants", "a \"quoted\\ name"]),
            json!([orders, zero("tenants"), quoted, none])
        );
    }

    #[test]
    fn broken_lines_count_nothing() {
        for line in [
            "keyward_produce_records_total{rule=\"orders\",decision=\"forwarded\"",
            "keyward_produce_records_total{rule=\"orders,decision=\"forwarded\"} 3",
            "keyward_produce_records_total{rule=\"orders\",decision=\"forwarded\"}",
            "keyward_produce_records_total{rule=\"orders\",decision=\"forwarded\"} x",
            "keyward_produce_records_total{rule=\"orders\",decision=\"sent\"} 3",
        ] {
            let counted = per_rule(line, &["orders"]);
            assert_eq!(counted[0]["forwarded"], 0, "{line}");
        }
    }
}
