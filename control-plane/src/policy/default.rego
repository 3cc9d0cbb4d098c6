# The platform policy: the guardrails every tenant gets. A tenant's own
# policy (package sandbox.tenant) is evaluated after this one and can only
# add reasons to deny, never remove these.
#
# Input: {"identity": {tenant, subject, app, agent, roles},
#         "action": "job.submit" | ...,
#         "resource": {...},
#         "request": {runtime, limits, packages, egress, secrets, ...}}
# Output: `deny`, a set of human-readable reasons; empty means allowed.
package sandbox.platform

# Every action the API performs. Anything else is refused, so a new
# action must be named here before anyone may perform it.
known_actions := {
	"job.submit", "job.read", "job.cancel",
	"session.create", "session.read", "session.delete",
	"step.run", "step.read",
	"workflow.create", "workflow.read", "workflow.cancel",
	"file.read", "file.write", "file.delete",
	"artifact.read", "artifact.write", "artifact.delete",
	"runtime.list", "audit.read",
}

deny contains msg if {
	not known_actions[input.action]
	msg := sprintf("unknown action %q", [input.action])
}

# Default-deny egress: the sandbox has no network. A named host can only be
# opened by a platform policy that allows it and an egress proxy that
# enforces it (a later issue).
deny contains msg if {
	count(object.get(input.request, "egress", [])) > 0
	msg := sprintf("network egress is denied by default (asked for %v)", [input.request.egress])
}

# Secrets are not handed to sandboxes until secret injection exists.
deny contains msg if {
	count(object.get(input.request, "secrets", [])) > 0
	msg := "secrets are not enabled for this tenant"
}
