-- replace_backup_codes: plan each call for its own arguments. A plpgsql function caches the plans
-- of its statements per connection; the first plans, made while twofa_backup_codes was small,
-- were sequential scans that stayed as the table grew (benchmark: 1.9 ms -> 5.4 ms a call from
-- 2k to 16k rows; flat at about 2.3 ms with custom plans).

-- migrate:up

SET LOCAL lock_timeout = '5s';

ALTER FUNCTION kitium_auth.replace_backup_codes(uuid, uuid[], text[])
  SET plan_cache_mode = force_custom_plan;

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER FUNCTION kitium_auth.replace_backup_codes(uuid, uuid[], text[]) RESET plan_cache_mode;
