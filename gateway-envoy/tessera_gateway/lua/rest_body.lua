-- Tessera gateway, REST body check: refuses a JSON body that names a field its protobuf message does not have.
--
-- The gRPC-JSON transcoder drops unknown JSON fields silently (envoy #46623), so a misspelt field would be
-- ignored instead of reported. This filter runs just before the transcoder, finds the http rule of the request
-- (method + path template), reads the body with a small JSON reader and compares every object key, at every
-- depth, with the fields of the message at that place. A field the path binds may be repeated in the body only
-- with the path's value: the transcoder refuses another value under the field's proto name but drops one under its
-- JSON name silently, so both spellings are compared here. Syntax errors are left to the transcoder, which reports
-- them. The generator prepends the tables this code reads:
--   RULES     list of {method, pattern (Lua pattern of the path, a capture per variable), message (body type),
--             prefix (field path), bound ([body key, both spellings] = {capture number, bound field path})}
--   MESSAGES  [message name] = {[json key] = kind}; a kind is "" (scalar or enum), "*" (any JSON),
--             "m:<message>", "a:<kind>" (repeated) or "o:<kind>" (map values)
--   DOMAIN    ErrorInfo domain of the gateway's errors

local byte, sub, find, concat = string.byte, string.sub, string.find, table.concat
local MAX_VIOLATIONS = 20
local SYNTAX = {}
local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40) end
  return string.char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", byte(c))
  end) .. '"'
end

-- Returns the list of unknown field paths in text and the list of {key, value} of the keys in bound that hold a
-- string or another scalar, or nil when text is not JSON this reader understands.
local function read_body(text, root, prefix, bound)
  local pos, len = 1, #text
  local found, seen = {}, {}

  local function fail() error(SYNTAX, 0) end

  local function skip_ws()
    pos = find(text, "[^ \t\r\n]", pos) or (len + 1)
  end

  local function read_string()
    local parts, i = {}, pos + 1
    while true do
      local j = find(text, '["\\]', i)
      if not j then fail() end
      parts[#parts + 1] = sub(text, i, j - 1)
      if byte(text, j) == 34 then
        pos = j + 1
        return concat(parts)
      end
      local c = sub(text, j + 1, j + 1)
      if c == "u" then
        local hex = sub(text, j + 2, j + 5)
        if not find(hex, "^%x%x%x%x$") then fail() end
        parts[#parts + 1] = utf8_char(tonumber(hex, 16))
        i = j + 6
      else
        local e = ESCAPES[c]
        if not e then fail() end
        parts[#parts + 1] = e
        i = j + 2
      end
    end
  end

  local function join(path, key)
    if path == "" then return key end
    return path .. "." .. key
  end

  local value

  -- kind: "m:<message>" checks keys, "o:<kind>" checks map values, anything else reads without checking.
  local function object(kind, path)
    pos = pos + 1
    skip_ws()
    if byte(text, pos) == 125 then
      pos = pos + 1
      return
    end
    local fields, map_kind = nil, nil
    if sub(kind, 1, 2) == "m:" then
      fields = MESSAGES[sub(kind, 3)]
    elseif sub(kind, 1, 2) == "o:" then
      map_kind = sub(kind, 3)
    end
    while true do
      skip_ws()
      if byte(text, pos) ~= 34 then fail() end
      local key = read_string()
      skip_ws()
      if byte(text, pos) ~= 58 then fail() end
      pos = pos + 1
      local child = "*"
      if fields ~= nil then
        child = fields[key]
        if child == nil then
          if #found < MAX_VIOLATIONS then found[#found + 1] = join(path, key) end
          child = "*"
        end
      elseif map_kind ~= nil then
        child = map_kind
      end
      local full = join(path, key)
      local scalar = value(child, full)
      if scalar ~= nil and bound[full] ~= nil then seen[#seen + 1] = { full, scalar } end
      skip_ws()
      local c = byte(text, pos)
      if c == 44 then
        pos = pos + 1
      elseif c == 125 then
        pos = pos + 1
        return
      else
        fail()
      end
    end
  end

  local function array(kind, path)
    pos = pos + 1
    skip_ws()
    if byte(text, pos) == 93 then
      pos = pos + 1
      return
    end
    local element = "*"
    if sub(kind, 1, 2) == "a:" then element = sub(kind, 3) end
    local index = 0
    while true do
      value(element, path .. "[" .. index .. "]")
      index = index + 1
      skip_ws()
      local c = byte(text, pos)
      if c == 44 then
        pos = pos + 1
      elseif c == 93 then
        pos = pos + 1
        return
      else
        fail()
      end
    end
  end

  -- Reads one value; returns a string's contents or a number's or boolean's text, nil for anything else.
  value = function(kind, path)
    skip_ws()
    local c = byte(text, pos)
    if c == 123 then
      object(kind, path)
    elseif c == 91 then
      array(kind, path)
    elseif c == 34 then
      return read_string()
    elseif sub(text, pos, pos + 3) == "true" then
      pos = pos + 4
      return "true"
    elseif sub(text, pos, pos + 3) == "null" then
      pos = pos + 4
    elseif sub(text, pos, pos + 4) == "false" then
      pos = pos + 5
      return "false"
    else
      local b, e = find(text, "^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
      if not e then fail() end
      pos = e + 1
      return sub(text, b, e)
    end
    return nil
  end

  local ok, err = pcall(function()
    value("m:" .. root, prefix)
    skip_ws()
    if pos <= len then fail() end
  end)
  if not ok then
    if err == SYNTAX then return nil end
    error(err, 0)
  end
  return found, seen
end

-- A path segment as the transcoder binds it: percent-decoded.
local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- gRPC as Envoy and the transcoder tell it: application/grpc, or application/grpc+<codec> or ;<parameters>. Any
-- other type (application/grpc-web, ...) is transcoded as REST, so it is REST here too.
local function is_grpc(content_type)
  return sub(content_type, 1, 16) == "application/grpc" and find(sub(content_type, 17, 17), "^[+;]?$") ~= nil
end

-- The rule of a request and the values of its path's variables, in template order.
local function find_rule(method, path)
  local q = find(path, "?", 1, true)
  if q then path = sub(path, 1, q - 1) end
  for _, rule in ipairs(RULES) do
    if rule.method == method then
      local match = { find(path, rule.pattern) }
      if match[1] then return rule, { unpack(match, 3) } end
    end
  end
  return nil, nil
end

-- A 400 in the JSON error shape: an ErrorInfo (reason, request_id and the first field, if metadata_field) and a
-- BadRequest with a violation per {field, description}.
local function refuse(handle, reason, message, request_id, metadata_field, violations)
  local items = {}
  for i, v in ipairs(violations) do
    items[i] = '{"field":' .. json_string(v[1]) .. ',"description":' .. json_string(v[2]) .. '}'
  end
  local metadata = '"request_id":' .. json_string(request_id)
  if metadata_field then metadata = metadata .. ',"field":' .. json_string(violations[1][1]) end
  local payload = '{"code":3,"message":' .. json_string(message) .. ',"details":['
    .. '{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":' .. json_string(reason) .. ',"domain":'
    .. json_string(DOMAIN) .. ',"metadata":{' .. metadata .. '}},'
    .. '{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[' .. concat(items, ",") .. ']}]}'
  handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, payload)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  if is_grpc(content_type) then return end
  local rule, variables = find_rule(headers:get(":method"), headers:get(":path") or "")
  if rule == nil then return end
  local request_id = headers:get("x-request-id") or ""
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  local unknown, seen = read_body(body:getBytes(0, body:length()), rule.message, rule.prefix, rule.bound)
  if unknown == nil then return end
  if #unknown > 0 then
    local violations = {}
    for i, field in ipairs(unknown) do
      violations[i] = { field, "unknown field: the request has no field of this name" }
    end
    refuse(handle, "UNKNOWN_FIELD", "invalid request: unknown field" .. (#unknown > 1 and "s " or " ")
      .. concat(unknown, ", "), request_id, true, violations)
    return
  end
  local conflicts, names = {}, {}
  for _, kv in ipairs(seen) do
    local binding = rule.bound[kv[1]]
    if kv[2] ~= percent_decode(variables[binding[1]]) then
      conflicts[#conflicts + 1] = { kv[1], "differs from " .. binding[2]
        .. " in the path: leave the field out of the body or give it the same value" }
      names[#names + 1] = kv[1]
    end
  end
  if #conflicts > 0 then
    refuse(handle, "MALFORMED_REQUEST", "invalid request: the body's " .. concat(names, ", ")
      .. " differ" .. (#names > 1 and "" or "s") .. " from the value the path gives", request_id, false, conflicts)
  end
end
