//! What a command prints: virsh-like text by default, YAML or JSON for scripts.

use std::io::{self, Write};

use serde_json::Value;

/// Output format, `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Tables and field lists that read like virsh.
    #[default]
    Table,
    Yaml,
    Json,
}

/// The result of one command, before it is printed.
pub enum Output {
    /// Nothing to print (`setmem`, like virsh).
    Empty,
    /// One line, such as `Domain 'web' started`.
    Message(String),
    /// `Label:  value` lines (dominfo, pool-info), label column `width` wide.
    Fields {
        width: usize,
        rows: Vec<(&'static str, String)>,
        data: Value,
    },
    /// A virsh table.
    Table { table: Table, data: Value },
    /// Free text (domstate, uri), and its data for scripts.
    Text { text: String, data: Value },
}

impl Output {
    /// Writes the output in the chosen format.
    pub fn print(&self, format: Format, out: &mut dyn Write) -> io::Result<()> {
        match format {
            Format::Table => self.print_text(out),
            Format::Json => match self.data() {
                Some(v) => {
                    serde_json::to_writer_pretty(&mut *out, &v)?;
                    writeln!(out)
                }
                None => Ok(()),
            },
            Format::Yaml => match self.data() {
                Some(v) => {
                    let text = serde_yaml_ng::to_string(&v).map_err(io::Error::other)?;
                    out.write_all(text.as_bytes())
                }
                None => Ok(()),
            },
        }
    }

    fn data(&self) -> Option<Value> {
        match self {
            Self::Empty => None,
            Self::Message(m) => Some(serde_json::json!({ "message": m })),
            Self::Fields { data, .. } | Self::Table { data, .. } | Self::Text { data, .. } => {
                Some(data.clone())
            }
        }
    }

    fn print_text(&self, out: &mut dyn Write) -> io::Result<()> {
        match self {
            Self::Empty => Ok(()),
            Self::Message(m) => writeln!(out, "{m}"),
            Self::Text { text, .. } => writeln!(out, "{text}"),
            Self::Fields { width, rows, .. } => {
                for (label, value) in rows {
                    let label = format!("{label}:");
                    writeln!(out, "{label:<width$} {value}", width = *width)?;
                }
                Ok(())
            }
            Self::Table { table, .. } => table.print(out),
        }
    }
}

/// A table laid out as virsh lays them out: a leading space, columns as wide
/// as their widest cell, three spaces between them, a dashed rule.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let mut s = String::new();
            let n = widths.len();
            for (i, (cell, w)) in cells.zip(&widths).enumerate() {
                s.push(' ');
                s.push_str(cell);
                if i + 1 < n {
                    s.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
                }
            }
            s
        };
        writeln!(out, "{}", line(&mut self.headers.iter().copied()))?;
        let rule: usize = widths.iter().map(|w| w + 3).sum();
        writeln!(out, "{}", "-".repeat(rule))?;
        for row in &self.rows {
            writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &Table) -> String {
        let mut buf = Vec::new();
        t.print(&mut buf).expect("write to a Vec");
        String::from_utf8(buf).expect("utf8")
    }

    #[test]
    fn lays_out_like_virsh_list() {
        let mut t = Table::new(&["Id", "Name", "State"]);
        t.row(vec!["1".into(), "test".into(), "running".into()]);
        assert_eq!(
            render(&t),
            " Id   Name   State\n----------------------\n 1    test   running\n"
        );
        let empty = Table::new(&["Id", "Name", "State"]);
        assert_eq!(render(&empty), " Id   Name   State\n--------------------\n");
    }
}
