//! Samples gathered from Postgres, and their conversion into Prometheus metric families.

use std::collections::BTreeMap;

use prometheus::proto::{self, MetricFamily, MetricType};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// One value of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn gauge(name: &str, help: &str, value: f64) -> Sample {
        Sample {
            name: name.into(),
            help: help.into(),
            kind: Kind::Gauge,
            labels: Vec::new(),
            value,
        }
    }
    pub fn counter(name: &str, help: &str, value: f64) -> Sample {
        Sample {
            kind: Kind::Counter,
            ..Sample::gauge(name, help, value)
        }
    }
    pub fn label(mut self, name: &str, value: impl Into<String>) -> Sample {
        self.labels.push((name.into(), value.into()));
        self
    }
}

/// Groups samples into families (one HELP/TYPE per name); the first sample's help and kind
/// win, and a sample whose kind conflicts with its family is dropped.
pub fn to_families(samples: impl IntoIterator<Item = Sample>) -> Vec<MetricFamily> {
    let mut families: BTreeMap<String, MetricFamily> = BTreeMap::new();
    for s in samples {
        let kind = match s.kind {
            Kind::Gauge => MetricType::GAUGE,
            Kind::Counter => MetricType::COUNTER,
        };
        let family = families.entry(s.name.clone()).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(s.name.clone());
            f.set_help(if s.help.is_empty() {
                s.name.replace('_', " ")
            } else {
                s.help.clone()
            });
            f.set_field_type(kind);
            f
        });
        if family.get_field_type() != kind {
            continue;
        }
        let mut metric = proto::Metric::default();
        let mut labels: Vec<proto::LabelPair> = s
            .labels
            .iter()
            .map(|(k, v)| {
                let mut l = proto::LabelPair::default();
                l.set_name(k.clone());
                l.set_value(v.clone());
                l
            })
            .collect();
        labels.sort_by(|a, b| a.get_name().cmp(b.get_name()));
        metric.set_label(labels);
        match s.kind {
            Kind::Gauge => {
                let mut g = proto::Gauge::default();
                g.set_value(s.value);
                metric.set_gauge(g);
            }
            Kind::Counter => {
                let mut c = proto::Counter::default();
                c.set_value(s.value);
                metric.set_counter(c);
            }
        }
        family.mut_metric().push(metric);
    }
    families.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_and_drops_conflicting_kinds() {
        let fams = to_families([
            Sample::gauge("a", "A", 1.0).label("x", "1"),
            Sample::gauge("a", "ignored", 2.0).label("x", "2"),
            Sample::counter("a", "", 3.0),
            Sample::counter("b_total", "", 4.0),
        ]);
        assert_eq!(fams.len(), 2);
        assert_eq!(fams[0].get_name(), "a");
        assert_eq!(fams[0].get_help(), "A");
        assert_eq!(fams[0].get_metric().len(), 2);
        assert_eq!(fams[1].get_field_type(), MetricType::COUNTER);
    }
}
