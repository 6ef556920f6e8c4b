"""Staged, health-gated rollouts: the pure planner and the runner that does its I/O.

`states` (rollout, device and observation states; RolloutError), `actions` (what the planner asks
for), `waves` (splitting targets into waves), `record` (a rollout's data, queries and stored form),
`plan` (`Rollout`, the state machine, and the rules it follows), `classify` (device events and
statuses as observations), `commands` (an action's signed-command arguments) are pure: values and the
time in, values out. `runner` persists rollouts, sends the commands the planner asks for and runs the
timers; `sharing` is its part for several controllers on one registry (leases, takeover, forwarding).
"""
