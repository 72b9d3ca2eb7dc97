#!/usr/bin/env bash
# Lays out fuzz/corpus/<target>/ from the repository's examples and the small hand-written
# seeds of fuzz/seeds/<target>/. The corpus directories are not committed (libFuzzer adds
# what it finds to them); rerunning this only adds the seeds back.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
corpus="$root/fuzz/corpus"
mkdir -p "$corpus"/{event_validation,segment_parse,flow_parse,template_compile,link_verify}

# One file per YAML document (`---` lines separate them), named after its source.
split_documents() {
    local target=$1
    shift
    local file
    for file in "$@"; do
        awk -v out="$corpus/$target/$(basename "$file" .yaml)" '
            /^---[[:space:]]*$/ { if (text != "") { n++; printf "%s", text > (out "-" n ".yaml"); close(out "-" n ".yaml") } text = ""; next }
            { text = text $0 "\n" }
            END { if (text != "") { n++; printf "%s", text > (out "-" n ".yaml") } }
        ' "$file"
    done
}
split_documents segment_parse "$root"/examples/segments/*.yaml
split_documents flow_parse "$root"/examples/flows/*.yaml
split_documents template_compile "$root"/examples/templates/*.yaml

# Events: hand-written edge cases, and `order_completed` events made of the first invoices
# of the Online Retail sample (as `relance import` sends them, in the proto's JSON shape).
cp "$root"/fuzz/seeds/event_validation/* "$corpus/event_validation/"
(zcat "$root/examples/data/online-retail-sample.csv.gz" || true) | awk -F, -v out="$corpus/event_validation/retail" '
    NR == 1 || $7 == "" { next }
    $1 != invoice {
        if (invoice != "") { finish() }
        invoice = $1; customer = $7; sub(/\.0$/, "", customer); when = $5; items = ""; revenue = 0
    }
    {
        if (items != "") items = items ","
        items = items sprintf("{\"product_id\":\"%s\",\"name\":\"%s\",\"quantity\":%d,\"price\":%s}", $2, $3, $4, $6)
        revenue += $4 * $6
    }
    function finish() {
        n++
        file = out "-" n ".json"
        sub(/ /, "T", when)
        printf "{\"message_id\":\"order-%s\",\"name\":\"order_completed\",\"customer_id\":\"%s\",\"timestamp\":\"%sZ\",\"properties\":{\"order_id\":\"%s\",\"revenue\":%.2f,\"currency\":\"GBP\",\"items\":[%s]},\"context\":{\"channel\":\"web\",\"country\":\"%s\"}}\n", invoice, customer, when, invoice, revenue, items, $8 > file
        close(file)
        if (n == 12) { exit }
    }
'

# Links: the bytes before the MAC of a click, an open and an unsubscribe link (first byte
# >= 0x80: the target signs them), and a token-shaped string (first byte < 0x80).
uuid='\x01\x8f\x3a\x5c\x7d\x2e\x7b\x4c\x9a\x11\x22\x33\x44\x55\x66\x77'
target='https://shop.example/cart?utm_source=relance'
printf "\x81\x01c\x04shop${uuid}\x$(printf %02x ${#target})${target}" > "$corpus/link_verify/click"
printf "\x82\x01o\x04shop${uuid}" > "$corpus/link_verify/open"
printf "\x80\x01u\x04shop${uuid}\x03c42\x02\x09marketing" > "$corpus/link_verify/unsubscribe"
printf '\x00AWMEc2hvcAGPOlx9LntMmhEiM0RVZncfaHR0cHM6Ly9zaG9wLmV4YW1wbGUvY2FydD94PTE' > "$corpus/link_verify/token"

for dir in "$corpus"/*; do
    echo "seeded $(basename "$dir"): $(find "$dir" -type f | wc -l) files"
done
