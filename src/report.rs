//! The output of `tollgate usage`: ledger report rows rendered as an aligned table, JSON or CSV.
//!
//! Invariant: every format lists the same rows in the same order, the most expensive first
//! (then by the dimension values), so the first row answers "who is burning the budget";
//! amounts are exact (micro-dollars printed with 6 decimals, never through a float in text).

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::pricing::format_usd as usd;
use crate::store::{Dimension, Ledger, ReportQuery, ReportRow, StoreError, UsageDelta};

/// How `tollgate usage` prints its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    /// Aligned columns with a TOTAL line, for people.
    Table,
    /// `{"rows": [...], "total": {...}}`, for programs.
    Json,
    /// A header line and one line per row (no total), RFC 4180 quoting.
    Csv,
}

/// The metric columns, after the dimensions.
const METRICS: [&str; 7] = [
    "requests",
    "input",
    "cached_input",
    "output",
    "reasoning",
    "tokens",
    "usd",
];

/// Opens the ledger at `path` read-only and renders its report for `query`.
pub fn generate(
    path: &Path,
    query: &ReportQuery,
    format: ReportFormat,
) -> Result<String, StoreError> {
    let ledger = Ledger::open_read_only(path)?;
    let rows = ledger.report(query)?;
    Ok(render(&rows, &query.by, format))
}

/// Renders `rows` with one column per dimension of `by` (in that order, repeats ignored).
pub fn render(rows: &[ReportRow], by: &[Dimension], format: ReportFormat) -> String {
    let mut dimensions: Vec<Dimension> = Vec::with_capacity(by.len());
    for dimension in by {
        if !dimensions.contains(dimension) {
            dimensions.push(*dimension);
        }
    }
    let mut sorted: Vec<(Vec<String>, &ReportRow)> = rows
        .iter()
        .map(|row| {
            let keys = dimensions.iter().map(|d| row.dimension(*d)).collect();
            (keys, row)
        })
        .collect();
    sorted.sort_by(|(ka, a), (kb, b)| by_cost_then_keys(ka, a, kb, b));
    let mut total = UsageDelta::default();
    for (_, row) in &sorted {
        total.add(&row.usage);
    }
    match format {
        ReportFormat::Table => table(&sorted, &dimensions, &total),
        ReportFormat::Json => json(&sorted, &dimensions, &total),
        ReportFormat::Csv => csv(&sorted, &dimensions),
    }
}

fn by_cost_then_keys(
    keys_a: &[String],
    a: &ReportRow,
    keys_b: &[String],
    b: &ReportRow,
) -> Ordering {
    b.usage
        .micro_usd
        .cmp(&a.usage.micro_usd)
        .then_with(|| keys_a.cmp(keys_b))
}

/// The metric cells of a usage, in [`METRICS`] order.
fn metrics(usage: &UsageDelta) -> [String; 7] {
    [
        usage.requests.to_string(),
        usage.input_tokens.to_string(),
        usage.cached_input_tokens.to_string(),
        usage.output_tokens.to_string(),
        usage.reasoning_tokens.to_string(),
        usage.tokens().to_string(),
        usd(usage.micro_usd),
    ]
}

fn table(
    rows: &[(Vec<String>, &ReportRow)],
    dimensions: &[Dimension],
    total: &UsageDelta,
) -> String {
    let header: Vec<String> = dimensions
        .iter()
        .map(|d| d.as_str().to_owned())
        .chain(METRICS.iter().map(|m| (*m).to_owned()))
        .collect();
    let mut lines: Vec<Vec<String>> = vec![header];
    for (keys, row) in rows {
        lines.push(keys.iter().cloned().chain(metrics(&row.usage)).collect());
    }
    // With no dimension the single row is already the total.
    let total_line = !dimensions.is_empty();
    if total_line {
        let mut cells = vec![String::new(); dimensions.len()];
        cells[0] = "TOTAL".to_owned();
        lines.push(cells.into_iter().chain(metrics(total)).collect());
    }

    let columns = lines.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .filter_map(|line| line.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let rule_width = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
    let mut out = String::new();
    let last = lines.len() - 1;
    for (index, line) in lines.iter().enumerate() {
        if total_line && index == last {
            let _ = writeln!(out, "{}", "-".repeat(rule_width));
        }
        let mut text = String::new();
        for (c, cell) in line.iter().enumerate() {
            if c > 0 {
                text.push_str("  ");
            }
            let width = widths.get(c).copied().unwrap_or(0);
            // Dimensions read left to right, numbers line up on the right.
            if c < dimensions.len() {
                let _ = write!(text, "{cell:<width$}");
            } else {
                let _ = write!(text, "{cell:>width$}");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    }
    out
}

#[derive(Serialize)]
struct JsonReport<'a> {
    rows: Vec<JsonRow<'a>>,
    total: JsonUsage,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<String>,
    #[serde(flatten)]
    usage: JsonUsage,
}

#[derive(Serialize)]
struct JsonUsage {
    requests: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    tokens: u64,
    /// Exact.
    micro_usd: u64,
    /// `micro_usd / 1e6`, for convenience.
    usd: f64,
}

impl From<&UsageDelta> for JsonUsage {
    fn from(usage: &UsageDelta) -> Self {
        JsonUsage {
            requests: usage.requests,
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            output_tokens: usage.output_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            tokens: usage.tokens(),
            micro_usd: usage.micro_usd,
            usd: usage.micro_usd as f64 / 1e6,
        }
    }
}

fn json(
    rows: &[(Vec<String>, &ReportRow)],
    dimensions: &[Dimension],
    total: &UsageDelta,
) -> String {
    let has = |d: Dimension| dimensions.contains(&d);
    let report = JsonReport {
        rows: rows
            .iter()
            .map(|(_, row)| JsonRow {
                project: row.project.as_deref().filter(|_| has(Dimension::Project)),
                model: row.model.as_deref().filter(|_| has(Dimension::Model)),
                credential: row
                    .credential
                    .as_deref()
                    .filter(|_| has(Dimension::Credential)),
                day: row
                    .day
                    .filter(|_| has(Dimension::Day))
                    .map(|d| d.format("%Y-%m-%d").to_string()),
                usage: JsonUsage::from(&row.usage),
            })
            .collect(),
        total: JsonUsage::from(total),
    };
    match serde_json::to_string_pretty(&report) {
        Ok(text) => text + "\n",
        // Plain structs of strings and numbers always serialize; keep the CLI's contract anyway.
        Err(err) => format!("{{\"error\": {:?}}}\n", err.to_string()),
    }
}

fn csv(rows: &[(Vec<String>, &ReportRow)], dimensions: &[Dimension]) -> String {
    let mut out = String::new();
    let header: Vec<&str> = dimensions
        .iter()
        .map(|d| d.as_str())
        .chain(METRICS)
        .collect();
    push_csv_line(&mut out, header.iter().copied());
    for (keys, row) in rows {
        let cells = metrics(&row.usage);
        push_csv_line(
            &mut out,
            keys.iter()
                .map(String::as_str)
                .chain(cells.iter().map(String::as_str)),
        );
    }
    out
}

/// One CRLF-terminated record, each field quoted when it holds a comma, a quote, CR or LF
/// (RFC 4180), with quotes doubled.
fn push_csv_line<'a>(out: &mut String, fields: impl Iterator<Item = &'a str>) {
    for (index, field) in fields.enumerate() {
        if index > 0 {
            out.push(',');
        }
        if field.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&field.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(field);
        }
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;

    fn usage(requests: u64, micro_usd: u64) -> UsageDelta {
        UsageDelta {
            requests,
            input_tokens: 1000 * requests,
            cached_input_tokens: 100 * requests,
            output_tokens: 10 * requests,
            reasoning_tokens: requests,
            micro_usd,
        }
    }

    fn row(project: &str, model: &str, requests: u64, micro_usd: u64) -> ReportRow {
        ReportRow {
            project: Some(project.to_owned()),
            model: Some(model.to_owned()),
            usage: usage(requests, micro_usd),
            ..ReportRow::default()
        }
    }

    fn rows() -> Vec<ReportRow> {
        vec![
            row("batch", "gpt-4o-mini", 2, 1_500),
            row("search", "gpt-4o", 12, 3_250_000),
            row("batch", "gpt-4o", 1, 1_500),
        ]
    }

    const BY: [Dimension; 2] = [Dimension::Project, Dimension::Model];

    #[test]
    fn usd_has_six_decimals() {
        assert_eq!(usd(0), "0.000000");
        assert_eq!(usd(1), "0.000001");
        assert_eq!(usd(3_250_000), "3.250000");
        assert_eq!(usd(12_345_678_901), "12345.678901");
    }

    #[test]
    fn table_is_aligned_sorted_by_cost_and_totalled() {
        let text = render(&rows(), &BY, ReportFormat::Table);
        let expected = "\
project  model        requests  input  cached_input  output  reasoning  tokens       usd
search   gpt-4o             12  12000          1200     120         12   12120  3.250000
batch    gpt-4o              1   1000           100      10          1    1010  0.001500
batch    gpt-4o-mini         2   2000           200      20          2    2020  0.001500
----------------------------------------------------------------------------------------
TOTAL                       15  15000          1500     150         15   15150  3.253000
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn a_table_without_dimensions_is_its_own_total() {
        let total = ReportRow {
            usage: usage(3, 7),
            ..ReportRow::default()
        };
        let text = render(&[total], &[], ReportFormat::Table);
        assert_eq!(
            text,
            "requests  input  cached_input  output  reasoning  tokens       usd\n       3   3000           300      30          3    3030  0.000007\n"
        );
        let empty = render(&[], &[Dimension::Project], ReportFormat::Table);
        assert!(empty.starts_with("project  requests"), "{empty}");
        assert!(
            empty.ends_with(&format!(
                "{}\nTOTAL           0      0             0       0          0       0  0.000000\n",
                "-".repeat(75)
            )),
            "{empty}"
        );
    }

    #[test]
    fn json_lists_the_chosen_dimensions_and_a_total() {
        let text = render(&rows(), &[Dimension::Project], ReportFormat::Json);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rows = value["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["project"], "search");
        assert!(rows[0].get("model").is_none(), "model was not asked for");
        assert_eq!(rows[0]["requests"], 12);
        assert_eq!(rows[0]["input_tokens"], 12000);
        assert_eq!(rows[0]["cached_input_tokens"], 1200);
        assert_eq!(rows[0]["output_tokens"], 120);
        assert_eq!(rows[0]["reasoning_tokens"], 12);
        assert_eq!(rows[0]["tokens"], 12120);
        assert_eq!(rows[0]["micro_usd"], 3_250_000);
        assert_eq!(rows[0]["usd"], 3.25);
        assert_eq!(value["total"]["requests"], 15);
        assert_eq!(value["total"]["micro_usd"], 3_253_000);
        assert_eq!(value["total"]["usd"], 3.253);

        let days = [ReportRow {
            day: NaiveDate::from_ymd_opt(2026, 11, 26),
            usage: usage(1, 1),
            ..ReportRow::default()
        }];
        let text = render(&days, &[Dimension::Day], ReportFormat::Json);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["rows"][0]["day"], "2026-11-26");
    }

    #[test]
    fn csv_has_a_header_and_quotes_per_rfc_4180() {
        let text = render(&rows(), &BY, ReportFormat::Csv);
        let expected = "project,model,requests,input,cached_input,output,reasoning,tokens,usd\r\n\
search,gpt-4o,12,12000,1200,120,12,12120,3.250000\r\n\
batch,gpt-4o,1,1000,100,10,1,1010,0.001500\r\n\
batch,gpt-4o-mini,2,2000,200,20,2,2020,0.001500\r\n";
        assert_eq!(text, expected);

        let odd = [row("a,b", "say \"hi\"\nnow", 1, 1)];
        let text = render(&odd, &BY, ReportFormat::Csv);
        let line = text.lines().nth(1).unwrap();
        assert_eq!(line, "\"a,b\",\"say \"\"hi\"\"");
        assert!(
            text.contains("\"a,b\",\"say \"\"hi\"\"\nnow\",1,"),
            "{text}"
        );
    }

    #[test]
    fn ties_in_cost_sort_by_dimension_values_in_order() {
        let tied = [
            row("b", "x", 1, 5),
            row("a", "y", 1, 5),
            row("a", "x", 1, 5),
        ];
        let text = render(
            &tied,
            &[Dimension::Model, Dimension::Project],
            ReportFormat::Csv,
        );
        let firsts: Vec<&str> = text.lines().skip(1).map(|l| &l[..3]).collect();
        assert_eq!(firsts, ["x,a", "x,b", "y,a"]);
    }
}
