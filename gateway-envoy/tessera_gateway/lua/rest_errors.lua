-- Tessera gateway, error responses: one google.rpc.Status for every error the gateway makes, over REST and gRPC.
--
-- This is the outermost filter that sees every response on the way out. REST: the transcoder's JSON (a service's
-- google.rpc.Status, details kept) passes; the plain-text local replies of Envoy's own filters (JWT, RBAC, rate
-- limit, router, buffer, transcoder) are rewritten into the same google.rpc.Status JSON with an ErrorInfo in the
-- gateway's domain; every grpc-* header is stripped. Native gRPC: a local reply (marked by the connection
-- manager's local_reply_config with its HTTP status in LOCAL_REPLY_HEADER) gets the same code, message and
-- details as its REST twin, as grpc-status, grpc-message and a grpc-status-details-bin header (the serialized
-- google.rpc.Status, base64) in the trailers-only response; replies from the services pass untouched. The
-- generator prepends:
--   DOMAIN              ErrorInfo domain of the gateway's errors
--   CODES               [reason] = google.rpc.Code number of each gateway error over REST
--   GRPC_CODES          [reason] = google.rpc.Code number of each gateway error over native gRPC
--   CODE_BY_STATUS      [HTTP status] = google.rpc.Code number for local replies without a better reason
--   MAX_BODY_BYTES      the request body limit
--   LOCAL_REPLY_HEADER  the header local_reply_config adds to every local reply (value: its HTTP status)
--   CLAIMS_REFUSED_KEY  the key of the RBAC filters' dynamic metadata that says the token claims check refused
--   CLAIMS_POLICY_KEY   the key of the RBAC filters' dynamic metadata that names the policy that refused
--   CLAIMS_REFUSALS     [policy] = the text of the token claims check's refusal
-- Routes carry metadata under this filter's name: service, route_class, scopes, retry_after, timeout.

local byte, char, sub, find, concat = string.byte, string.char, string.sub, string.find, table.concat
local NS = "tessera.gateway"
local AUDIENCE_REFUSED = "Audiences in Jwt are not allowed"
local ROUTE_KEYS = { "service", "route_class", "scopes", "retry_after", "timeout" }

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", byte(c))
  end) .. '"'
end

local function squash(text)
  return (text:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

local function without_query(path)
  local q = find(path or "", "?", 1, true)
  if q then return sub(path, 1, q - 1) end
  return path or ""
end

-- What went wrong, from the status of a local reply, its text and the route: reason, message, metadata pairs
-- and BadRequest field violations.
local function classify(status, text, info, route)
  local service = route.service or "upstream"
  if status == 400 then
    local field = text:match('Could not find field "(.-)" in the type')
    if field then
      return "UNKNOWN_QUERY_PARAMETER", "invalid request: unknown query parameter " .. field, { { "field", field } },
        { { field, "unknown query parameter: the request has no field of this name" } }
    end
    local why = squash(text)
    if why == "" then return "MALFORMED_REQUEST", "the request could not be read", {}, nil end
    return "MALFORMED_REQUEST", "the request could not be read: " .. why, {}, nil
  elseif status == 401 then
    if text == "Jwt is missing" then
      return "TOKEN_MISSING", "this route needs a bearer token: send Authorization: Bearer <JWT>", {}, nil
    elseif text == "Jwt is expired" then
      return "TOKEN_EXPIRED", "the bearer token has expired", {}, nil
    end
    return "TOKEN_INVALID", "the bearer token was refused: " .. squash(text), {}, nil
  elseif status == 403 then
    local scopes = route.scopes or ""
    return "MISSING_SCOPE", "the token has none of the scopes this method needs: " .. scopes,
      { { "required_scopes", scopes } }, nil
  elseif status == 404 then
    if info.protocol == "grpc" then
      return "ROUTE_NOT_FOUND", "no route matches the gRPC method " .. (info.path or ""), {}, nil
    end
    return "ROUTE_NOT_FOUND",
      "no REST route matches " .. (info.method or "") .. " " .. without_query(info.path), {}, nil
  elseif status == 413 then
    return "PAYLOAD_TOO_LARGE", "the request body is larger than " .. MAX_BODY_BYTES .. " bytes", {}, nil
  elseif status == 429 then
    local class = route.route_class or "public"
    return "RATE_LIMITED", "too many requests in route class " .. class .. "; retry after "
      .. (route.retry_after or "1") .. " s", { { "route_class", class } }, nil
  elseif status == 502 or status == 503 then
    return "UPSTREAM_UNAVAILABLE", "the " .. service .. " service is unavailable; retry later",
      { { "service", service } }, nil
  elseif status == 504 then
    return "UPSTREAM_TIMEOUT", "the " .. service .. " service did not answer within "
      .. (route.timeout or "its timeout"), { { "service", service } }, nil
  end
  return "GATEWAY_ERROR", squash(text) ~= "" and squash(text) or ("HTTP " .. status), {}, nil
end

-- The error a local reply stands for: google.rpc.Status code and message, ErrorInfo reason and metadata pairs
-- (request_id first), and BadRequest field violations (or nil).
local function describe(status, text, info, route)
  local reason, message, metadata, violations = classify(status, text, info, route)
  local code
  if reason == "GATEWAY_ERROR" then
    code = CODE_BY_STATUS[status] or 2
  elseif info.protocol == "grpc" then
    code = GRPC_CODES[reason] or CODES[reason]
  else
    code = CODES[reason]
  end
  local pairs_list = { { "request_id", info.request_id or "" } }
  for _, kv in ipairs(metadata) do pairs_list[#pairs_list + 1] = kv end
  return { code = code, message = message, reason = reason, metadata = pairs_list, violations = violations }
end

-- The proto3 JSON of the google.rpc.Status (the REST body).
local function status_json(e)
  local pairs_json = {}
  for i, kv in ipairs(e.metadata) do pairs_json[i] = json_string(kv[1]) .. ":" .. json_string(kv[2]) end
  local details = {
    '{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":' .. json_string(e.reason) .. ',"domain":'
      .. json_string(DOMAIN) .. ',"metadata":{' .. concat(pairs_json, ",") .. "}}",
  }
  if e.violations then
    local items = {}
    for i, v in ipairs(e.violations) do
      items[i] = '{"field":' .. json_string(v[1]) .. ',"description":' .. json_string(v[2]) .. "}"
    end
    details[#details + 1] = '{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":['
      .. concat(items, ",") .. "]}"
  end
  return '{"code":' .. e.code .. ',"message":' .. json_string(e.message) .. ',"details":[' .. concat(details, ",")
    .. "]}"
end

-- Protocol buffers wire format, just what google.rpc.Status, Any, ErrorInfo and BadRequest need.
local function varint(n)
  local out = {}
  repeat
    local b = n % 128
    n = (n - b) / 128
    if n > 0 then b = b + 128 end
    out[#out + 1] = char(b)
  until n == 0
  return concat(out)
end

-- A field's key is its number and wire type (0: varint, 2: length-delimited).
local function pb_varint(number, value)
  return varint(number * 8) .. varint(value)
end

local function pb_bytes(number, value)
  return varint(number * 8 + 2) .. varint(#value) .. value
end

local function pb_any(type_name, value)
  return pb_bytes(1, "type.googleapis.com/" .. type_name) .. pb_bytes(2, value)
end

-- The serialized google.rpc.Status (what grpc-status-details-bin carries, before base64).
local function status_proto(e)
  local info = { pb_bytes(1, e.reason), pb_bytes(2, DOMAIN) }
  for _, kv in ipairs(e.metadata) do info[#info + 1] = pb_bytes(3, pb_bytes(1, kv[1]) .. pb_bytes(2, kv[2])) end
  local details = { pb_bytes(3, pb_any("google.rpc.ErrorInfo", concat(info))) }
  if e.violations then
    local items = {}
    for i, v in ipairs(e.violations) do items[i] = pb_bytes(1, pb_bytes(1, v[1]) .. pb_bytes(2, v[2])) end
    details[#details + 1] = pb_bytes(3, pb_any("google.rpc.BadRequest", concat(items)))
  end
  return pb_varint(1, e.code) .. pb_bytes(2, e.message) .. concat(details)
end

-- grpc-message is percent-encoded (gRPC over HTTP/2): every byte outside printable ASCII, and "%" itself.
local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(hex) return char(tonumber(hex, 16)) end))
end

local function percent_encode(s)
  return (s:gsub("[^ -$&-~]", function(c) return string.format("%%%02X", byte(c)) end))
end

-- jwt_authn refuses a token for another audience with 403; like any invalid token it is a 401.
local function audience_refused(status, text)
  return status == 403 and text == AUDIENCE_REFUSED
end

-- The token claims check (an RBAC filter after jwt_authn) refuses with 403 a token whose scope claim holds a
-- control character or is not a string; like any invalid token it is a 401, whose text says why (nil: no refusal).
local function claims_refused(handle, status)
  if status ~= 403 then return nil end
  local rbac = handle:streamInfo():dynamicMetadata():get("envoy.filters.http.rbac")
  if rbac == nil or rbac[CLAIMS_REFUSED_KEY] ~= "denied" then return nil end
  return CLAIMS_REFUSALS[rbac[CLAIMS_POLICY_KEY]] or "its claims are refused"
end

local function invalid_token(headers)
  headers:replace("www-authenticate", 'Bearer realm="tessera", error="invalid_token"')
end

-- A native gRPC call the gateway refused itself: the same code, message and details as over REST.
local function answer_grpc(handle, headers, status, info, route)
  local text = percent_decode(headers:get("grpc-message") or "")
  local refused_text = claims_refused(handle, status)
  if refused_text ~= nil then
    status, text = 401, refused_text
    invalid_token(headers)
  elseif audience_refused(status, text) then
    status = 401
    invalid_token(headers)
  end
  local e = describe(status, text, info, route)
  headers:replace("grpc-status", tostring(e.code))
  headers:replace("grpc-message", percent_encode(e.message))
  headers:replace("grpc-status-details-bin", handle:base64Escape(status_proto(e)))
  if status == 429 then headers:replace("retry-after", route.retry_after or "1") end
end

-- A REST response carries no gRPC transport headers (grpc-status, grpc-message, grpc-accept-encoding, ...).
local function strip_grpc_headers(headers)
  local grpc_headers = {}
  for name, _ in pairs(headers) do
    if sub(name, 1, 5) == "grpc-" then grpc_headers[#grpc_headers + 1] = name end
  end
  for _, name in ipairs(grpc_headers) do headers:remove(name) end
end

-- The services keep a caller's x-request-id and x-correlation-id only if each is 1 to 128 printable ASCII
-- characters (else they make their own): the gateway keeps no other, so the response, its access log and the
-- services name one id.
local MAX_ID = 128

local function keepable(headers, name)
  local given = headers:get(name)
  return given ~= nil and #given >= 1 and #given <= MAX_ID and not find(given, "[^ -~]")
    and headers:getNumValues(name) == 1
end

-- Each worker's generator starts from the time and an address of this Lua state (which differ between workers,
-- processes and restarts), so two gateways never make the same sequence of ids.
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 2147483647 + os.clock() * 1e6)

-- A new version 4 UUID, as Envoy makes for a request that comes without an id.
local function new_request_id()
  local r = math.random
  return string.format("%04x%04x-%04x-4%03x-%04x-%04x%04x%04x", r(0, 0xffff), r(0, 0xffff), r(0, 0xffff),
    r(0, 0xfff), 0x8000 + r(0, 0x3fff), r(0, 0xffff), r(0, 0xffff), r(0, 0xffff))
end

local function keep_ids(headers)
  if not keepable(headers, "x-request-id") then headers:replace("x-request-id", new_request_id()) end
  if not keepable(headers, "x-correlation-id") then
    headers:replace("x-correlation-id", headers:get("x-request-id"))
  end
end

-- gRPC as Envoy and the transcoder tell it: application/grpc, or application/grpc+<codec> or ;<parameters>. Any
-- other type (application/grpc-web, ...) is transcoded as REST, so it is REST here too.
local function is_grpc(content_type)
  return sub(content_type, 1, 16) == "application/grpc" and find(sub(content_type, 17, 17), "^[+;]?$") ~= nil
end

-- The authentication scheme is case-insensitive (RFC 7235): jwt_authn looks for "Bearer " only, so any other
-- spelling of it is written that way.
local function canonical_scheme(headers)
  local authorization = headers:get("authorization")
  if authorization ~= nil and sub(authorization, 1, 7) ~= "Bearer "
      and string.lower(sub(authorization, 1, 7)) == "bearer " and headers:getNumValues("authorization") == 1 then
    headers:replace("authorization", "Bearer " .. sub(authorization, 8))
  end
end

-- A gRPC client's deadline reaches the service only as gRPC spells it (1 to 8 digits and a unit, sent once): the
-- services' gRPC library refuses any other grpc-timeout with INTERNAL, and from then on misreads the headers of
-- other clients' calls on the gateway's shared connection. Dropped, the call runs under the route's timeout.
local function readable_deadline(headers)
  local timeout = headers:get("grpc-timeout")
  if timeout ~= nil and (headers:getNumValues("grpc-timeout") ~= 1
      or not find(timeout, "^%d%d?%d?%d?%d?%d?%d?%d?[HMSmun]$")) then
    headers:remove("grpc-timeout")
  end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local info = handle:streamInfo():dynamicMetadata()
  keep_ids(headers)
  canonical_scheme(headers)
  if is_grpc(headers:get("content-type") or "") then
    readable_deadline(headers)
    info:set(NS, "protocol", "grpc")
    info:set(NS, "grpc_method", headers:get(":path") or "")
    info:set(NS, "request_id", headers:get("x-request-id") or "")
    return
  end
  local method = headers:get(":method") or ""
  info:set(NS, "protocol", "rest")
  info:set(NS, "method", method)
  info:set(NS, "path", headers:get(":path") or "")
  info:set(NS, "request_id", headers:get("x-request-id") or "")
  -- HEAD is GET without the response body (RFC 9110 9.3.2): the routes and http rules know GET, and the
  -- connection manager, which saw the HEAD, sends the response's headers only.
  if method == "HEAD" then headers:replace(":method", "GET") end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0
  -- The HTTP status of a local reply, for the gateway's own errors; nil on the services' replies.
  local local_status = tonumber(headers:get(LOCAL_REPLY_HEADER) or "")
  headers:remove(LOCAL_REPLY_HEADER)
  local stored = handle:streamInfo():dynamicMetadata():get(NS)
  -- Every successful call takes this path, so it reads nothing it does not need: a reply below 400 that the
  -- gateway did not make itself only loses its grpc-* headers over REST (a gRPC local reply is a 200 with the
  -- mark, so it never gets here).
  if status < 400 and local_status == nil then
    if stored ~= nil and stored.protocol == "rest" then strip_grpc_headers(headers) end
    return
  end
  -- Envoy's objects are only valid until the script yields (body() does), so the route's values are copied.
  local metadata = handle:metadata()
  local route = {}
  for _, key in ipairs(ROUTE_KEYS) do route[key] = metadata:get(key) end
  if status == 429 and headers:get("retry-after") == nil then
    headers:add("retry-after", route.retry_after or "1")
  end
  if stored == nil then
    -- The connection manager refused the request before any filter saw it (an escaped slash in the path, ...);
    -- only a gRPC local reply still says what the request was.
    if local_status == nil or sub(headers:get("content-type") or "", 1, 16) ~= "application/grpc" then return end
    stored = { protocol = "grpc", grpc_method = "", request_id = headers:get("x-request-id") or "" }
  end
  if stored.protocol == "grpc" then
    -- A trailers-only error the gateway made, unless something already gave it details.
    local grpc_status = headers:get("grpc-status")
    if local_status ~= nil and local_status >= 400 and grpc_status ~= nil and grpc_status ~= "0"
        and headers:get("grpc-status-details-bin") == nil then
      answer_grpc(handle, headers, local_status,
        { protocol = "grpc", path = stored.grpc_method, request_id = stored.request_id }, route)
    end
    return
  end
  local refused_text = nil
  if local_status ~= nil then refused_text = claims_refused(handle, status) end
  if refused_text ~= nil then
    headers:replace(":status", "401")
    invalid_token(headers)
    status = 401
  elseif status == 403 and sub(headers:get("content-type") or "", 1, 10) == "text/plain" then
    local body = handle:body(true)
    if body:length() > 0 and audience_refused(status, body:getBytes(0, body:length())) then
      handle:headers():replace(":status", "401")
      invalid_token(handle:headers())
      status = 401
    end
    headers = handle:headers()
  end
  local info = { protocol = "rest", method = stored.method, path = stored.path, request_id = stored.request_id }
  strip_grpc_headers(headers)
  if status < 400 or sub(headers:get("content-type") or "", 1, 16) == "application/json" then return end
  local body = handle:body(true)
  local text = refused_text or ""
  if refused_text == nil and body:length() > 0 then text = body:getBytes(0, body:length()) end
  body:setBytes(status_json(describe(status, text, info, route)))
  handle:headers():replace("content-type", "application/json")
end
