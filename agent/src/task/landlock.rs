//! Landlock: the last wall around a task's files. After pivot_root the task can name only
//! its own tree; Landlock makes that hold for descriptors and paths that would lead out
//! of it (an inherited fd, a later mount), at the best ABI the kernel and crate share.

use std::path::Path;

use landlock::{
    ABI, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
};

/// The newest ABI this build knows; the crate falls back to what the kernel offers.
const WANTED: ABI = ABI::V6;

/// Restricts the calling process (and what it execs) to `root` and below. Returns the
/// ABI in force, 0 when the kernel has no Landlock.
pub fn restrict_to(root: &Path) -> Result<u32, String> {
    let all = AccessFs::from_all(WANTED);
    let status = Ruleset::default()
        .handle_access(all)
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(landlock::path_beneath_rules([root], all)))
        .and_then(|r| r.restrict_self())
        .map_err(|e| e.to_string())?;
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as i32 as u32,
        _ => 0,
    };
    match status.ruleset {
        RulesetStatus::NotEnforced => Ok(0),
        _ => Ok(abi),
    }
}
