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

# Secrets by name, per tenant: none by default. A platform that hands
# secrets to sandboxes replaces this policy (POLICY_DEFAULT_PATH) with one
# that lists, per tenant, the names it may ask for, e.g.
#   allowed_secrets := {"acme": {"DB_PASSWORD"}}
# The values live in the data plane's secret source, scoped by tenant.
allowed_secrets := {}

deny contains msg if {
	some name in object.get(input.request, "secrets", [])
	not object.get(allowed_secrets, input.identity.tenant, set())[name]
	msg := sprintf("secret %q is not allowed for this tenant", [name])
}
