//! Conditions following the Kubernetes API conventions: the transition time moves only when
//! the status changes.

use crate::k8s::crd::Condition;
use crate::logging::now_rfc3339;

/// Sets (or adds) the condition of type `type_`. Returns whether anything changed.
pub fn set(
    list: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> bool {
    let status = if status { "True" } else { "False" };
    if let Some(c) = list.iter_mut().find(|c| c.type_ == type_) {
        let same = c.status == status
            && c.reason == reason
            && c.message == message
            && c.observed_generation == generation;
        if same {
            return false;
        }
        if c.status != status {
            c.last_transition_time = now_rfc3339();
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message.into();
        c.observed_generation = generation;
        return true;
    }
    list.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now_rfc3339(),
        observed_generation: generation,
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut list = Vec::new();
        assert!(set(
            &mut list,
            "ConfigApplied",
            true,
            "Applied",
            "ok",
            Some(1)
        ));
        let t0 = list[0].last_transition_time.clone();
        assert!(!set(
            &mut list,
            "ConfigApplied",
            true,
            "Applied",
            "ok",
            Some(1)
        ));
        list[0].last_transition_time = "earlier".into();
        assert!(set(
            &mut list,
            "ConfigApplied",
            true,
            "Applied",
            "ok",
            Some(2)
        ));
        assert_eq!(list[0].last_transition_time, "earlier");
        assert!(set(
            &mut list,
            "ConfigApplied",
            false,
            "Rejected",
            "bad",
            Some(3)
        ));
        assert_ne!(list[0].last_transition_time, "earlier");
        assert!(!t0.is_empty());
        assert_eq!(list.len(), 1);
    }
}
