# Session kernel driver for Bash, run as `bash --norc --noprofile -c <this>` in the sandbox.
# Request: a line "<nonce> <op>", then one line holding the code with
# backslash escapes (decoded by printf %b). Status JSON: {"exitCode":N}.
exec 3<&0 0</dev/null 4>&1 5>&2
trap '__sa_interrupted=1' INT
while :; do
  IFS=' ' read -r -u 3 __sa_nonce __sa_op || exit 0
  IFS= read -r -u 3 __sa_line || exit 0
  printf -v __sa_code '%b' "$__sa_line"
  __sa_interrupted=0
  eval "$__sa_code" 3<&- 4>&- 5>&-
  __sa_status=$?
  printf '\036\036SA:%s:\n' "$__sa_nonce" >&5
  printf '\036\036SA:%s:{"status":"ok","exitCode":%d}\n' "$__sa_nonce" "$__sa_status" >&4
done
