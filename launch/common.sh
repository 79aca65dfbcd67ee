# Shared by the launchers (sourced, not run).

# A port nothing on 127.0.0.1 answers on (29500 if 100 random tries all answer).
free_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  echo 29500
}
