"""What happens to a bundle once it arrives on the device.

`deploy` runs the state machine (fetch → verify → prepare → self-test → activate → probation),
`probation` holds the health gates that decide whether a new bundle stays, `candidate` prepares a
bundle beside the active one for shadow or A/B runs, and `shadow` mirrors live traffic to it.
"""
